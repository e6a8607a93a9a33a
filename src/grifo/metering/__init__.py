"""Stage 7: count real tokens, price them in integer micro-USD, one ledger entry per request."""
