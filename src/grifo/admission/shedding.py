"""Admission control: how many requests each point is given at once, who waits, who is shed.

Each point gets a concurrency limit learned from its answers (Netflix's Gradient2): the latency
sample is the request's time per output token, which grows when the point queues or its batch
is saturated; a short-term average is compared with a long-term one, and the limit follows

    limit ← limit × clamp(tolerance × long / short, 0.5, 1) + √limit

smoothed, growing only while the point is used at least half, and cut to 90% on a failure.
A request that finds every one of its candidates at its limit waits in one queue per gateway
process: higher priority first; within a priority, the tenant that was served least recently
by weight (start-time fair queuing), so no tenant starves another of its class. A full queue
sheds the lowest priority first (the newest request of the tenant holding the most places);
a request that waits longer than `max_wait_ms` or its own deadline is shed too: 503 with
`retry-after`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from grifo.config.model import AdmissionConfig
from grifo.errors import InvalidRequestError, OverloadedError
from grifo.placement.scoring import Candidate
from grifo.topology import PointState

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
HEADER = b"x-grifo-priority"


def request_priority(tenant_max: int, header: bytes | None) -> int:
    """The priority a request asked for, never above its tenant's (a caller may only lower it)."""
    if header is None:
        return tenant_max
    asked = PRIORITIES.get(header.decode("latin-1").strip().lower())
    if asked is None:
        raise InvalidRequestError(
            "x-grifo-priority must be low, normal or high", param="x-grifo-priority"
        )
    return min(asked, tenant_max)


class GradientLimit:
    """One point's concurrency limit (see the module docstring)."""

    __slots__ = ("_config", "_long", "_short", "in_flight", "limit", "sampled_at")

    def __init__(self, config: AdmissionConfig) -> None:
        self._config = config
        self.limit = float(config.initial_limit)
        self.in_flight = 0
        self._long: float | None = None  # long-term average sample (about 600 requests)
        self._short: float | None = None  # short-term average sample (about 10 requests)
        self.sampled_at = 0.0  # monotonic seconds of the last sample

    @property
    def recent_s(self) -> float | None:
        """The short-term average time per output token (None before any answer)."""
        return self._short

    def free(self) -> bool:
        return self.in_flight < int(self.limit)

    def observe(self, sample_s: float, in_flight: int) -> None:
        """A successful answer took `sample_s` per output token with `in_flight` requests out."""
        self._short = sample_s if self._short is None else self._short * 0.9 + sample_s * 0.1
        self.sampled_at = time.monotonic()
        self._long = sample_s if self._long is None else self._long * (599 / 600) + sample_s / 600
        if self._long > 2 * (self._short if self._short > 1e-9 else 1e-9):
            self._long *= 0.95  # the point got faster for good: let the baseline follow
        if in_flight < self.limit / 2:
            return  # not used enough to learn that more would be fine
        tolerance = self._config.tolerance
        gradient = min(1.0, max(0.5, tolerance * self._long / max(self._short, 1e-9)))
        target = self.limit * gradient + math.sqrt(self.limit)
        self._set(self.limit * 0.8 + target * 0.2)

    def failed(self) -> None:
        self._set(self.limit * 0.9)

    def _set(self, value: float) -> None:
        self.limit = min(float(self._config.max_limit), max(float(self._config.min_limit), value))


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: str
    priority: int
    points: tuple[str, ...]  # its candidates, best first
    future: asyncio.Future[PointState]
    timer: asyncio.TimerHandle | None = None
    since: float = field(default_factory=time.monotonic)


class Admission:
    """Slots on points, handed out at once or in priority and fair order (see module doc)."""

    def __init__(
        self,
        config: AdmissionConfig,
        points: Sequence[PointState],
        weights: dict[str, int] | None = None,
    ) -> None:
        self.config = config
        self.limits = {p.name: GradientLimit(config) for p in points}
        self._points = {p.name: p for p in points}
        self._weights = weights or {}
        self._queues: list[dict[str, deque[_Waiter]]] = [{} for _ in PRIORITIES]
        self._vtime: dict[str, float] = {}  # tenant -> virtual time of its next service
        self._clock = 0.0  # virtual time of the last service
        self.waiting = 0
        self.shed: dict[str, int] = {"queue_full": 0, "waited_too_long": 0}
        self._service_s = 1.0  # a running average of time in the gateway, for retry-after

    # -- entering and leaving --------------------------------------------------------------------
    def set_weights(self, weights: dict[str, int]) -> None:
        """Replace the tenants' weights (tenants made over the admin API come and go)."""
        self._weights = dict(weights)

    async def enter(
        self, tenant: str, priority: int, candidates: list[Candidate], wait_s: float
    ) -> list[Candidate]:
        """The candidates with the one given a slot first; waits (at most `wait_s` and
        `max_wait_ms`) when all are at their limit; raises OverloadedError when shed."""
        if not self.waiting:
            for i, candidate in enumerate(candidates):
                limit = self.limits.get(candidate.point.name)  # None: it left the fabric
                if limit is not None and limit.free():
                    limit.in_flight += 1
                    return _first(candidates, i)
        waiter = _Waiter(
            tenant,
            priority,
            tuple(c.point.name for c in candidates),
            asyncio.get_running_loop().create_future(),
        )
        self._enqueue(waiter)
        self._grant()  # a slot may be free for this one while others wait elsewhere
        wait_s = min(wait_s, self.config.max_wait_ms / 1000)
        waiter.timer = asyncio.get_running_loop().call_later(wait_s, self._expire, waiter)
        try:
            point = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave(waiter.future.result().name)  # granted as the client left
            else:
                self._remove(waiter)
            raise
        finally:
            waiter.timer.cancel()
        return _first(candidates, next(i for i, c in enumerate(candidates) if c.point is point))

    def leave(self, point: str, *, sample_s: float | None = None, ok: bool = True) -> None:
        """A request given a slot on `point` is done there (`sample_s`: its time per token)."""
        limit = self.limits[point]
        in_flight = limit.in_flight
        limit.in_flight -= 1
        if not ok:
            limit.failed()
        elif sample_s is not None:
            limit.observe(sample_s, in_flight)
        if self.waiting:
            self._grant()

    def observe_time(self, seconds: float) -> None:
        self._service_s = self._service_s * 0.95 + seconds * 0.05

    # -- the queue ------------------------------------------------------------------------------
    def _enqueue(self, waiter: _Waiter) -> None:
        if self.waiting >= self.config.max_queue:
            victim = self._victim(waiter.priority)
            if victim is None:
                self.shed["queue_full"] += 1
                raise OverloadedError(_FULL, retry_after_s=self._retry_after_s())
            self._remove(victim)
            self.shed["queue_full"] += 1
            victim.future.set_exception(OverloadedError(_FULL, retry_after_s=self._retry_after_s()))
        queue = self._queues[waiter.priority].setdefault(waiter.tenant, deque())
        queue.append(waiter)
        self.waiting += 1
        self._vtime.setdefault(waiter.tenant, self._clock)

    def _victim(self, newcomer_priority: int) -> _Waiter | None:
        """The newest waiter of the tenant with most places in the lowest class below the
        newcomer's; None if the newcomer itself is the one to shed."""
        for priority in range(newcomer_priority):
            tenants = self._queues[priority]
            if tenants:
                busiest = max(tenants.values(), key=len)
                return busiest[-1]
        return None

    def _grant(self) -> None:
        """Give free slots to waiters: highest priority first, then least-served tenant."""
        for tenants in reversed(self._queues):
            for tenant in sorted(tenants, key=self._vtime.__getitem__):
                for waiter in list(tenants[tenant])[:8]:
                    point = self._free_point(waiter.points)
                    if point is None:
                        continue
                    self._remove(waiter)
                    self.limits[point.name].in_flight += 1
                    self._clock = max(self._clock, self._vtime[tenant])
                    self._vtime[tenant] = self._clock + 1 / self._weights.get(tenant, 1)
                    waiter.future.set_result(point)
                    if not self.waiting:
                        return

    def _free_point(self, names: tuple[str, ...]) -> PointState | None:
        for name in names:
            limit = self.limits.get(name)  # None: it left the fabric
            if limit is not None and limit.free() and self._points[name].healthy:
                return self._points[name]
        return None

    def add_point(self, point: PointState) -> None:
        """A point joined (registry/roster.py); one that was here before keeps its limit."""
        self._points[point.name] = point
        self.limits.setdefault(point.name, GradientLimit(self.config))

    def forget(self, name: str) -> bool:
        """Drop a point that left, once no request holds a slot there (False: not yet)."""
        limit = self.limits.get(name)
        if limit is not None and limit.in_flight > 0:
            return False
        self.limits.pop(name, None)
        self._points.pop(name, None)
        return True

    def _remove(self, waiter: _Waiter) -> None:
        tenants = self._queues[waiter.priority]
        queue = tenants.get(waiter.tenant)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del tenants[waiter.tenant]
        self.waiting -= 1

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._remove(waiter)
        self.shed["waited_too_long"] += 1
        waited_ms = (time.monotonic() - waiter.since) * 1000
        waiter.future.set_exception(
            OverloadedError(
                f"every compliant point is at its concurrency limit; waited {waited_ms:.0f} ms",
                retry_after_s=self._retry_after_s(),
            )
        )

    def _retry_after_s(self) -> float:
        capacity = sum(int(limit.limit) for limit in self.limits.values()) or 1
        return max(1.0, self._service_s * (self.waiting + 1) / capacity)


_FULL = "the gateway's queue is full: lower-priority requests are shed first"


def _first(candidates: list[Candidate], i: int) -> list[Candidate]:
    return candidates if i == 0 else [candidates[i], *candidates[:i], *candidates[i + 1 :]]
