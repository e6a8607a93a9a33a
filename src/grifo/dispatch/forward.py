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


async def forward(
    pools: PointPools,
    candidates: Sequence[Candidate],
    path: str,
    body: bytes,
    headers: Headers,
    head_timeout_s: float,
    ejection: EjectionConfig,
) -> tuple[PointState, UpstreamResponse, float]:
    """The first candidate that answers, with its response head and its busy-clock mark (give
    it back with `point.busy.leave` when the request is done there)."""
    for candidate in candidates:
        point = candidate.point
        mark = point.busy.enter(time.monotonic_ns())
        try:
            response = await pools[point.name].request(
                "POST", path, headers=headers, body=body, head_timeout_s=head_timeout_s
            )
        except PointUnavailableError as exc:
            point.busy.leave(mark, time.monotonic_ns())
            point.mark_down(str(exc))
            log.warning("point %s unavailable, trying the next compliant one", point.name)
            continue
        except BaseException as exc:
            point.busy.leave(mark, time.monotonic_ns())
            if isinstance(exc, PointTimeoutError | PointProtocolError):
                point.failed(time.monotonic(), ejection)
            raise
        claimed = response.headers.get(b"x-grifo-jurisdiction", b"").decode("latin-1")
        if claimed != point.jurisdiction:
            response.close()
            point.busy.leave(mark, time.monotonic_ns())
            point.mark_down(f"reports jurisdiction {claimed!r}, configured {point.jurisdiction}")
            raise PointProtocolError("the point's answer did not match its configured jurisdiction")
        return point, response, mark
    raise NoCompliantPointError(
        "every compliant point refused the request; it was not sent anywhere else"
    )
