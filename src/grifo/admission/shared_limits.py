"""Rate limits shared by gateway replicas (Redis), with the local limiter's behaviour: the asks
of one event-loop turn go to Redis in one script call, together with the requests that ended
since (their token corrections and running counts). If Redis cannot be reached, requests are
admitted (limits protect capacity; failing closed would make Redis an outage of its own) and
`unchecked` counts them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grifo.config.model import LimitsConfig
from grifo.errors import RateLimitedError, StoreUnavailableError
from grifo.security.keys import Principal
from grifo.store.redis_limits import RedisLimiter

log = logging.getLogger("grifo.limits")


@dataclass(slots=True)
class SharedLease:
    request_id: str
    scopes: list[str]
    tokens: int
    open: bool = True


@dataclass(slots=True)
class _Ask:
    lease: SharedLease
    limits: list[LimitsConfig]
    expires_ms: int
    future: asyncio.Future[tuple[int, float]]


class SharedLimits:
    def __init__(
        self,
        limiter: RedisLimiter,
        tenants: Mapping[str, LimitsConfig],
        keys: Mapping[str, LimitsConfig],
    ) -> None:
        self._limiter = limiter
        self._tenants = tenants
        self._keys = keys
        self._asks: list[_Ask] = []
        self._finished: list[tuple[str, int, list[str]]] = []
        self._deciding = False
        self._timer: asyncio.TimerHandle | None = None
        self.unchecked = 0

    def applies(self, principal: Principal) -> bool:
        return principal.tenant in self._tenants or principal.key_id in self._keys

    def set_tenants(self, tenants: Mapping[str, LimitsConfig]) -> None:
        """Replace the tenants' limits (their state is in Redis, by tenant name)."""
        self._tenants = dict(tenants)

    async def acquire(
        self, principal: Principal, tokens: int, request_id: str, hold_s: float
    ) -> SharedLease:
        pairs = [
            (f"tenant:{principal.tenant}", self._tenants.get(principal.tenant)),
            (f"key:{principal.key_id}", self._keys.get(principal.key_id)),
        ]
        active = [(scope, limits) for scope, limits in pairs if limits is not None]
        lease = SharedLease(request_id, [s for s, _ in active], tokens)
        loop = asyncio.get_running_loop()
        expires_ms = int((time.time() + hold_s + 60) * 1000)  # then a dead gateway's ask ends
        ask = _Ask(lease, [limits for _, limits in active], expires_ms, loop.create_future())
        self._asks.append(ask)
        self._kick()
        refused, wait_s = await ask.future
        if refused:
            scope, limits = active[refused - 1]
            lease.open = False
            raise _refusal(scope, limits, tokens, wait_s)
        return lease

    def done(self, lease: SharedLease, used_tokens: int | None) -> None:
        if not lease.open:
            return
        lease.open = False
        refund = 0 if used_tokens is None else lease.tokens - used_tokens
        self._finished.append((lease.request_id, refund, lease.scopes))
        if self._timer is None and not self._deciding:
            self._timer = asyncio.get_running_loop().call_later(0.002, self._kick)

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._deciding:
            self._deciding = True
            asyncio.get_running_loop().create_task(self._decide())

    async def _decide(self) -> None:
        try:
            while self._asks or self._finished:
                asks, self._asks = self._asks, []
                finished, self._finished = self._finished, []
                await self._batch(asks, finished)
        finally:
            self._deciding = False

    async def _batch(self, asks: list[_Ask], finished: list[tuple[str, int, list[str]]]) -> None:
        index: dict[str, int] = {}
        for scope in [s for a in asks for s in a.lease.scopes] + [
            s for f in finished for s in f[2]
        ]:
            index.setdefault(scope, len(index))
        payload: list[dict[str, Any]] = [
            {
                "id": a.lease.request_id,
                "e": a.expires_ms,
                "t": a.lease.tokens,
                "s": [
                    [index[scope], *_numbers(limits)]
                    for scope, limits in zip(a.lease.scopes, a.limits, strict=True)
                ],
            }
            for a in asks
        ]
        ended = [(rid, refund, [index[s] for s in scopes]) for rid, refund, scopes in finished]
        try:
            results = await self._limiter.decide(list(index), payload, ended)
        except StoreUnavailableError:
            log.warning("rate limit store unavailable: admitting %d requests unchecked", len(asks))
            self.unchecked += len(asks)
            results = [(0, 0.0)] * len(asks)
        for ask, result in zip(asks, results, strict=True):
            if not ask.future.done():
                ask.future.set_result(result)
            elif result[0] == 0:  # the request is gone: end it
                self.done(ask.lease, 0)

    async def close(self) -> None:
        if self._finished:
            await self._batch([], self._finished)
            self._finished = []
        await self._limiter.close()


def _numbers(limits: LimitsConfig) -> list[int]:
    """Requests per minute, tokens per minute, requests at once; -1 for no limit."""
    values = (limits.requests_per_min, limits.tokens_per_min, limits.concurrent)
    return [-1 if v is None else v for v in values]


def _refusal(scope: str, limits: LimitsConfig, tokens: int, wait_s: float) -> RateLimitedError:
    name = scope.replace(":", " ", 1)
    if wait_s < 0:
        return RateLimitedError(
            f"this request may use {tokens} tokens, more than the {name}'s "
            f"{limits.tokens_per_min} per minute; lower max_tokens",
            retry_after_s=60.0,
        )
    return RateLimitedError(
        f"the {name} is over one of its limits (requests or tokens per minute, or requests "
        "at once)",
        retry_after_s=max(wait_s, 0.001),
    )
