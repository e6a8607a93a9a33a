"""Stage 3: whether a request may start now (idempotency keys; budgets and limits come here)."""
