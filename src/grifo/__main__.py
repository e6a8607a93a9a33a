from grifo.cli import main

raise SystemExit(main())
