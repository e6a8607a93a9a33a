"""What the gateway knows about one request as it moves through the stages of `service.py`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grifo.admission.budgets import Reservation
from grifo.audit.signing import Claims
from grifo.guardrails.policy import Verdict
from grifo.security.keys import Principal
from grifo.topology import PointState


def _nothing() -> None:
    return None


@dataclass(slots=True)
class Exchange:
    """What the gateway knows about one request as it moves through the stages."""

    request_id: str
    endpoint: str
    received_ns: int
    principal: Principal
    model: str
    point: PointState | None = None
    reservation: Reservation | None = None
    lease: Any = None  # a rate limiter's lease
    dispatched_ns: int = 0
    busy_mark: float = 0.0
    busy_share_ns: int | None = None
    timeout_s: float = 0.0
    deadline: float = 0.0  # monotonic seconds
    deadline_hit: bool = False
    cancel_deadline: Callable[[], None] = _nothing
    body: bytes = b""
    allowed: frozenset[str] | None = None
    data_class: str = ""
    answer: bytes | None = None  # a whole response's body, for the audit record
    attestation: str | None = None
    claims: Claims | None = None  # to attest, for a whole answer: signed in a batch
    point_receipt: str = ""
    tier: str = "any"
    span: Any = None  # the request's trace span, when tracing is on
    slot: str | None = None  # the point whose admission slot this request holds
    tried: list[tuple[PointState, str]] | None = None  # attempts before the answer's, outcome
    verdict: Verdict | None = None  # the tenant's guardrails' findings, when it has any
    redacted: str = ""  # what was redacted before dispatch ("EMAIL:1,CPF:1", "none")
    session: str | None = None  # tenant and session id, for session affinity
    first_token_ns: int = 0  # monotonic: a stream's first output passed the gateway
    prompt_estimate: int = 0  # prompt tokens to bill if a stream's engine never says

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()
