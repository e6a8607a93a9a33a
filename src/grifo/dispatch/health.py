"""Active health checks: poll each point's /health and /load, and check what it says it is."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import msgspec

from grifo.errors import GrifoError
from grifo.topology import ModelCard, PointState

from .pools import PointPools

log = logging.getLogger("grifo.health")


class _Health(msgspec.Struct):
    status: str
    name: str
    jurisdiction: str
    models: list[ModelCard] = []
    public_key: str | None = None
    tools: dict[str, str] | None = None  # tool: its jurisdiction; None: runs no agent runs


class _Load(msgspec.Struct):
    in_flight: int = 0
    queued: int = 0
    tokens_per_s: float = 0.0
    cache_usage: float = 0.0  # an engine's KV cache in use, 0..1 (vLLM, llama.cpp's server)


async def check_point(pools: PointPools, point: PointState, timeout_s: float = 2.0) -> None:
    """Refresh one point's state; any failure marks it down with the reason."""
    try:
        pool = pools[point.name]  # a point that left since the round began: down, harmlessly
        health = await pool.request("GET", "/health", head_timeout_s=timeout_s)
        body = await asyncio.wait_for(health.read(), timeout_s)
        if health.status != 200:
            point.mark_down(f"/health answered {health.status}")
            return
        info = msgspec.json.decode(body, type=_Health)
        if info.name != point.name or info.jurisdiction != point.jurisdiction:
            point.mark_down(
                f"point reports itself as {info.name} in {info.jurisdiction}; configured as "
                f"{point.name} in {point.jurisdiction}"
            )
            return
        load_resp = await pool.request("GET", "/load", head_timeout_s=timeout_s)
        load = msgspec.json.decode(await asyncio.wait_for(load_resp.read(), timeout_s), type=_Load)
    except (GrifoError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        point.mark_down(f"health check failed: {exc}")
        return
    point.set_models({m.id: m for m in info.models})
    point.public_key = info.public_key
    point.tools = info.tools
    point.reported(load.queued, load.in_flight)
    point.tokens_per_s = load.tokens_per_s
    point.cache_usage = min(max(load.cache_usage, 0.0), 1.0)
    if point.ejected(time.monotonic()):
        return  # healthy to a probe, but failing real requests: wait out the ejection
    if point.ejections and point.ejected_until and not point.healthy:
        point.probation = True  # half-open: real traffic decides, and one failure suffices
        point.ejected_until = 0.0
    if not point.healthy:
        log.info("point %s is up", point.name)
    point.healthy, point.reason = True, "ok"


class HealthPoller:
    def __init__(
        self,
        pools: PointPools,
        points: Sequence[PointState],
        interval_s: float,
        after_round: Callable[[], object] = lambda: None,
    ) -> None:
        self._pools = pools
        self._points = points
        self._interval_s = interval_s
        self._after_round = after_round  # e.g. judge latency outliers on the fresh state
        self._task: asyncio.Task[None] | None = None

    async def check_all(self) -> None:
        await asyncio.gather(*(check_point(self._pools, p) for p in self._points))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            self._after_round()
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
