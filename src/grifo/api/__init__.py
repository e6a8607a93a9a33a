"""Stage 1 and the way out: the gateway's HTTP routes and the mapping of errors to responses."""
