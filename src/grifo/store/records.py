"""What the stores hold, independent of which database holds it."""

from __future__ import annotations

from typing import NamedTuple


class LedgerEntry(NamedTuple):
    """One metered request. `usage_source` is `point` (reported) or `estimated` (cut short).

    A tuple in column order, so rows go to `executemany` without conversion.
    """

    request_id: str
    ts_ms: int
    tenant: str
    key_id: str
    endpoint: str
    model: str
    point: str
    jurisdiction: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    status: str
    usage_source: str
    latency_ms: float


TOTAL_COLUMNS = {
    "tenant": "tenant",
    "key": "key_id",
    "point": "point",
    "model": "model",
    "jurisdiction": "jurisdiction",
}


class BudgetCheck(NamedTuple):
    """One budget a request must fit in: `tenant:<name>` or `key:<id>`, for one period."""

    scope: str
    period_start_ms: int
    limit_micros: int | None
    strict: bool
    limit_tokens: int | None = None


class Amount(NamedTuple):
    """What a request costs or may cost: micro-USD and tokens (prompt + completion)."""

    micros: int
    tokens: int


class StoredOutcome(NamedTuple):
    """What an idempotency key holds: a claim in progress (status None) or a finished answer."""

    fingerprint: str
    request_id: str
    started_ms: int
    status: int | None
    headers: str | None
    body: bytes | None
    stream: int | None


class StoredKey(NamedTuple):
    """A key as the state database holds it (the hash, never the key)."""

    id: str
    tenant: str
    sha256: str
    role: str = "user"
    expires_ms: int | None = None
    models: str = ""  # comma-separated allow-list; empty: every model


class Ask(NamedTuple):
    """A reservation wanted: `worst` in every one of `checks`, held at most `hold_s`."""

    checks: list[BudgetCheck]
    worst: Amount
    request_id: str
    hold_s: float


class Settlement(NamedTuple):
    """A reservation done with: `reserved` is given back, `actual` is spent."""

    checks: list[BudgetCheck]
    request_id: str
    reserved: Amount
    actual: Amount
