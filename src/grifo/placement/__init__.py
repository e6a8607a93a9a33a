"""Stage 5: where a request may run (jurisdiction, a hard filter) and where it runs best."""
