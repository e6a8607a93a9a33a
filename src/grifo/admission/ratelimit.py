"""Rate limits per tenant and per key: requests per minute, tokens per minute, requests at once.

Requests and tokens are token buckets that refill continuously (a minute's allowance is also
the burst). A request takes one request and its worst-case tokens (prompt bound + `max_tokens`)
from every bucket that applies, all or nothing; when it ends, what it did not use comes back and
what it used beyond that is owed. The concurrency count is held until then. Refused: 429
`rate_limit_exceeded` with `retry-after`, the time until the short bucket has enough again.

The limits are kept in this gateway process; each `--workers` process or replica enforces its
own share (documented), and the clock is injectable so tests need not sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from grifo.config.model import LimitsConfig
from grifo.errors import RateLimitedError
from grifo.security.keys import Principal


@dataclass(slots=True)
class Bucket:
    capacity: float
    per_s: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        level = self.level + (now - self.at) * self.per_s
        # Not min(): on Python 3.11 it parses keywords on every call, ~90 ns against ~12.
        self.level = level if level < self.capacity else self.capacity
        self.at = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is there (inf if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.per_s)


@dataclass(slots=True)
class Scope:
    """The limits of one tenant or key, and their state."""

    name: str
    limits: LimitsConfig
    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0


@dataclass(slots=True)
class Lease:
    """What one admitted request holds until `RateLimits.done`."""

    scopes: tuple[Scope, ...] = ()
    tokens: int = 0
    open: bool = True


class Limiter(Protocol):
    """Local (`RateLimits`) or shared by replicas (`shared_limits.SharedLimits`)."""

    def applies(self, principal: Principal) -> bool: ...

    async def acquire(
        self, principal: Principal, tokens: int, request_id: str, hold_s: float
    ) -> Any: ...

    def done(self, lease: Any, used_tokens: int | None) -> None: ...

    def set_tenants(self, tenants: Mapping[str, LimitsConfig]) -> None: ...

    async def close(self) -> None: ...


_MAX_CACHED = 65536  # (tenant, key) pairs whose scopes are kept; past that, looked up each time


class RateLimits:
    def __init__(
        self,
        tenants: Mapping[str, LimitsConfig],
        keys: Mapping[str, LimitsConfig],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self._tenants = {n: _scope(f"tenant {n}", c, now) for n, c in tenants.items()}
        self._keys = {n: _scope(f"key {n}", c, now) for n, c in keys.items()}
        # The scopes of each (tenant, key) seen, emptied when the tenants' limits change.
        self._scopes: dict[tuple[str, str], tuple[Scope, ...]] = {}

    def applies(self, principal: Principal) -> bool:
        return principal.tenant in self._tenants or principal.key_id in self._keys

    def set_tenants(self, tenants: Mapping[str, LimitsConfig]) -> None:
        """Replace the tenants' limits; a tenant whose limits did not change keeps its state."""
        now = self._clock()
        fresh: dict[str, Scope] = {}
        for name, limits in tenants.items():
            scope = self._tenants.get(name)
            kept = scope is not None and scope.limits == limits
            fresh[name] = (
                scope if scope is not None and kept else _scope(f"tenant {name}", limits, now)
            )
        self._tenants = fresh
        self._scopes = {}

    async def acquire(
        self, principal: Principal, tokens: int, request_id: str, hold_s: float
    ) -> Lease:
        """`admit`, as the shared limiter (`shared_limits.py`) is called."""
        return self.admit(principal, tokens)

    async def close(self) -> None:
        pass

    def admit(self, principal: Principal, tokens: int) -> Lease:
        """Take one request and `tokens` from every limit of the caller, or raise 429."""
        scopes = self._scopes.get((principal.tenant, principal.key_id))
        if scopes is None:
            scopes = self._scopes_of(principal)
        now = self._clock()
        for scope in scopes:
            _check(scope, tokens, now)
        for scope in scopes:
            if scope.requests is not None:
                scope.requests.level -= 1
            if scope.tokens is not None:
                scope.tokens.level -= tokens
            scope.in_flight += 1
        return Lease(scopes, tokens)

    def _scopes_of(self, principal: Principal) -> tuple[Scope, ...]:
        found = (self._tenants.get(principal.tenant), self._keys.get(principal.key_id))
        scopes = tuple(s for s in found if s is not None)
        if len(self._scopes) < _MAX_CACHED:
            self._scopes[(principal.tenant, principal.key_id)] = scopes
        return scopes

    def done(self, lease: Lease, used_tokens: int | None) -> None:
        """The request ended having used `used_tokens` (None: unknown, keep the reservation)."""
        if not lease.open:
            return
        lease.open = False
        # Unused tokens come back; tokens used beyond the reservation are owed (the bucket may
        # go below zero and refills from there).
        refund = 0 if used_tokens is None else lease.tokens - used_tokens
        for scope in lease.scopes:
            scope.in_flight -= 1
            if scope.tokens is not None and refund:
                tokens = scope.tokens
                level = tokens.level + refund
                tokens.level = level if level < tokens.capacity else tokens.capacity


def _scope(name: str, limits: LimitsConfig, now: float) -> Scope:
    scope = Scope(name, limits)
    if limits.requests_per_min is not None:
        n = float(limits.requests_per_min)
        scope.requests = Bucket(n, n / 60, n, now)
    if limits.tokens_per_min is not None:
        n = float(limits.tokens_per_min)
        scope.tokens = Bucket(n, n / 60, n, now)
    return scope


def _check(scope: Scope, tokens: int, now: float) -> None:
    """Refill the scope's buckets to `now`; raise 429 if the request does not fit."""
    for bucket in (scope.requests, scope.tokens):
        if bucket is not None:
            bucket.refill(now)
    limits = scope.limits
    if limits.concurrent is not None and scope.in_flight >= limits.concurrent:
        raise RateLimitedError(
            f"the {scope.name} has {scope.in_flight} requests running, its limit; retry when "
            "one ends",
            retry_after_s=1.0,
        )
    if scope.requests is not None and scope.requests.level < 1:
        raise RateLimitedError(
            f"the {scope.name} is over its {limits.requests_per_min} requests per minute",
            retry_after_s=scope.requests.wait_s(1),
        )
    if scope.tokens is not None and scope.tokens.level < tokens:
        wait = scope.tokens.wait_s(tokens)
        if math.isinf(wait):
            raise RateLimitedError(
                f"this request may use {tokens} tokens, more than the {scope.name}'s "
                f"{limits.tokens_per_min} per minute; lower max_tokens",
                retry_after_s=60.0,
            )
        raise RateLimitedError(
            f"the {scope.name} is over its {limits.tokens_per_min} tokens per minute",
            retry_after_s=wait,
        )
