"""Persistence: the SQLite state database (keys, ledger) in the state directory."""
