"""One keep-alive connection pool per point; points that join and leave add and remove theirs."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from grifo.errors import PointUnavailableError
from grifo.http.client import ConnectionPool
from grifo.topology import PointState


class PointPools:
    """One keep-alive connection pool per point."""

    def __init__(
        self,
        points: Sequence[PointState],
        connect_timeout_s: float = 2.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._tls = tls
        self._pools: dict[str, ConnectionPool] = {}
        for point in points:
            self.add(point)

    def add(self, point: PointState, connect_host: str | None = None) -> None:
        """A pool for `point` (`connect_host`: the address its host was vetted as, pinned)."""
        self._pools[point.name] = ConnectionPool(
            point.host,
            point.port,
            connect_timeout_s=self._connect_timeout_s,
            tls=self._tls if point.tls else None,
            connect_host=connect_host,
        )

    def remove(self, name: str) -> ConnectionPool | None:
        """A point left: its pool, for the caller to close once nothing uses it."""
        return self._pools.pop(name, None)

    def __getitem__(self, name: str) -> ConnectionPool:
        pool = self._pools.get(name)
        if pool is None:  # it left the fabric after the request was placed: try the next one
            raise PointUnavailableError(f"the point {name} has left the fabric")
        return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
