"""Send a request to ranked candidates in order, moving on only while nothing has been answered.

Every candidate was already filtered by jurisdiction, so failover cannot leave the allowed set.
A point whose answer claims a different jurisdiction than configured is not trusted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from grifo.config.model import EjectionConfig
from grifo.errors import (
    NoCompliantPointError,
    PointProtocolError,
    PointTimeoutError,
    PointUnavailableError,
)
from grifo.http.client import ConnectionPool, UpstreamResponse
from grifo.http.message import Headers
from grifo.placement.scoring import Candidate
from grifo.topology import PointState

log = logging.getLogger("grifo.dispatch")


class PointPools:
    """One keep-alive connection pool per point."""

    def __init__(self, points: Sequence[PointState], connect_timeout_s: float = 2.0) -> None:
        self._pools = {
            p.name: ConnectionPool(p.host, p.port, connect_timeout_s=connect_timeout_s)
            for p in points
        }

    def __getitem__(self, name: str) -> ConnectionPool:
        return self._pools[name]

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()


class RetryBudget:
    """Envoy's retry budget: retries in progress stay under max(min_concurrent, ratio x requests
    being forwarded), so a failing region cannot multiply the load on the points left."""

    def __init__(self, ratio: float = 0.2, min_concurrent: int = 3) -> None:
        self._ratio = ratio
        self._min = min_concurrent
        self.active = 0
        self.retrying = 0

    def acquire(self) -> bool:
        if self.retrying >= max(self._min, self._ratio * self.active):
            return False
        self.retrying += 1
        return True


async def forward(
    pools: PointPools,
    candidates: Sequence[Candidate],
    request: tuple[str, bytes, Headers],
    head_timeout_s: float,
    ejection: EjectionConfig,
    budget: RetryBudget,
    *,
    blame_timeouts: bool = True,
) -> tuple[PointState, UpstreamResponse, float]:
    """The first candidate that answers, with its response head and its busy-clock mark (give
    it back with `point.busy.leave` when the request is done there).

    A refused connection moves on to the next candidate; so does a 5xx head while the retry
    budget allows (nothing has reached the client yet). Every candidate is in the allowed set.
    """
    budget.active += 1
    retries = 0
    try:
        for i, candidate in enumerate(candidates):
            point = candidate.point
            mark = point.busy.enter(time.monotonic_ns())
            response = await _attempt(
                pools, point, mark, request, head_timeout_s, ejection, blame_timeouts
            )
            if response is None:
                continue
            if response.status >= 500:
                point.failed(time.monotonic(), ejection)
                if i + 1 < len(candidates) and budget.acquire():
                    retries += 1
                    response.close()
                    point.busy.leave(mark, time.monotonic_ns())
                    log.warning("point %s answered %d, retrying", point.name, response.status)
                    continue
            return point, response, mark
    finally:
        budget.active -= 1
        budget.retrying -= retries
    raise NoCompliantPointError(
        "every compliant point refused the request; it was not sent anywhere else"
    )


async def _attempt(
    pools: PointPools,
    point: PointState,
    mark: float,
    request: tuple[str, bytes, Headers],
    head_timeout_s: float,
    ejection: EjectionConfig,
    blame_timeouts: bool,
) -> UpstreamResponse | None:
    """The point's response head, or None if it refused the connection (marked down)."""
    path, body, headers = request
    try:
        response = await pools[point.name].request(
            "POST", path, headers=headers, body=body, head_timeout_s=head_timeout_s
        )
    except PointUnavailableError as exc:
        point.busy.leave(mark, time.monotonic_ns())
        point.mark_down(str(exc))
        log.warning("point %s unavailable, trying the next compliant one", point.name)
        return None
    except BaseException as exc:
        point.busy.leave(mark, time.monotonic_ns())
        blame = isinstance(exc, PointProtocolError) or (
            isinstance(exc, PointTimeoutError) and blame_timeouts
        )
        if blame:  # a client's short deadline is not the point's fault
            point.failed(time.monotonic(), ejection)
        raise
    claimed = response.headers.get(b"x-grifo-jurisdiction", b"").decode("latin-1")
    if claimed != point.jurisdiction:
        response.close()
        point.busy.leave(mark, time.monotonic_ns())
        point.mark_down(f"reports jurisdiction {claimed!r}, configured {point.jurisdiction}")
        raise PointProtocolError("the point's answer did not match its configured jurisdiction")
    return response
