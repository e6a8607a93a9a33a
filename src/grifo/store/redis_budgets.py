"""Budget reservations shared by gateway replicas, in Redis.

Each budget scope (`tenant:<name>` or `key:<id>`) and period has three keys:

- `<prefix>:b:<scope>:<period>`: a hash of counters: reserved and spent micro-USD (`rm`, `sm`)
  and tokens (`rt`, `st`);
- `<prefix>:r:<scope>:<period>`: the open reservations, a sorted set of request ids by expiry;
- `<prefix>:a:<scope>:<period>`: what each open reservation holds (`"<micros> <tokens>"`).

Reserving checks every scope and takes the worst case from all of them in one Lua script, so
replicas racing for the last cent cannot overspend. A reservation whose gateway died expires
(its deadline plus a margin) and is given back by the next reservation in that scope. Spending
is counted from the ledger the first time a scope's period is seen (`init`), and again after a
settle was lost while Redis was unreachable.

A gateway's lease (`admission/leases.py`) is one more open reservation, named by the gateway's
lease id: what it holds counts as reserved, spending moves from it to the spent counters in
`lease` calls, and it expires like the others when its gateway stops calling.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from grifo.admission.leases import LeaseAnswer, LeaseChange
from grifo.errors import StoreUnavailableError
from grifo.store import redis_scripts as scripts
from grifo.store.records import Amount, Ask, BudgetCheck, Settlement

log = logging.getLogger("grifo.redis")
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_KEEP_S = 40 * 24 * 3600  # counters outlive the longest period (a month)
_encode = msgspec.json.Encoder().encode


class RedisReservations:
    """The budget store of `admission/budgets.py` for replicas: atomic in Redis.

    `spent(scope, since_ms)` reads the ledger (the source of truth) when a scope's counters
    must be rebuilt. A reservation outlives its request's deadline by `margin_s` before it is
    presumed abandoned. Settling happens in the background; `drain()` waits for it.
    """

    def __init__(
        self,
        url: str,
        spent: Callable[[str, int], Amount],
        *,
        prefix: str = "grifo",
        timeout_s: float = 0.5,
        margin_s: float = 60.0,
        max_connections: int = 32,
        settle_delay_s: float = 0.002,
    ) -> None:
        # Requests beyond `max_connections` wait for a free connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._spent = spent
        self._prefix = prefix
        self._margin_ms = int(margin_s * 1000)
        self._reserve = self._redis.register_script(scripts.RESERVE)
        self._settle = self._redis.register_script(scripts.SETTLE)
        self._init = self._redis.register_script(scripts.INIT)
        self._lease = self._redis.register_script(scripts.LEASE)
        self.lease_id = f"lease:{secrets.token_hex(8)}"
        self._stale: set[str] = set()  # counters that missed a settle while Redis was away
        self._dropped: set[tuple[str, str]] = set()  # (r, a) of leases in an unknown state
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: list[Settlement] = []
        self._timer: asyncio.TimerHandle | None = None
        self._settle_delay_s = settle_delay_s
        self._reserving = 0  # reserve calls in flight: the next one will carry settlements
        self.up = True

    def _keys(self, check: BudgetCheck) -> list[str]:
        tail = f"{check.scope}:{check.period_start_ms}"
        return [f"{self._prefix}:{part}:{tail}" for part in ("b", "r", "a")]

    def _scopes(
        self, checks: Iterable[BudgetCheck]
    ) -> tuple[dict[tuple[str, int], int], list[str]]:
        """Each distinct scope's index, and the keys of all of them in that order."""
        index: dict[tuple[str, int], int] = {}
        keys: list[str] = []
        for check in checks:
            if (check.scope, check.period_start_ms) not in index:
                index[check.scope, check.period_start_ms] = len(index)
                keys += self._keys(check)
        return index, keys

    async def reserve_many(self, asks: list[Ask]) -> list[BudgetCheck | None]:
        """Each ask's worst case in every one of its scopes, or nothing, in order; per ask the
        check that refused it or None. Settlements waiting to be sent go first, in the same
        call. Raises `StoreUnavailableError` when Redis is away."""
        self._reserving += 1
        try:
            return await self._reserve_many(asks)
        finally:
            self._reserving -= 1

    async def _reserve_many(self, asks: list[Ask]) -> list[BudgetCheck | None]:
        settling, self._pending = self._pending, []
        scopes = [c for s in settling for c in s.checks] + [c for a in asks for c in a.checks]
        index, keys = self._scopes(scopes)
        now_ms = int(time.time() * 1000)
        payload = [
            {
                "id": ask.request_id,
                "e": str(now_ms + int(ask.hold_s * 1000) + self._margin_ms),
                "m": str(ask.worst.micros),
                "t": str(ask.worst.tokens),
                "c": [
                    [
                        index[c.scope, c.period_start_ms],
                        -1 if c.limit_micros is None else c.limit_micros,
                        -1 if c.limit_tokens is None else c.limit_tokens,
                        int(c.strict),
                    ]
                    for c in ask.checks
                ],
            }
            for ask in asks
        ]
        settled = _encode(_settlements(settling, index))
        results: list[BudgetCheck | None] = [None] * len(asks)
        waiting = list(range(len(asks)))
        try:
            await self._forget_stale()
            for _ in range(2 * len(index) + 1):  # each scope is counted at most once or twice
                batch = _encode([payload[i] for i in waiting])
                raw = await self._reserve(keys=keys, args=[now_ms, _KEEP_S, batch, settled])
                settled = b"[]"
                answers = [int(a) for a in raw]
                for i, answer in zip(waiting, answers, strict=False):
                    results[i] = None if answer <= 0 else asks[i].checks[answer - 1]
                if answers[-1] >= 0:
                    self._mark(up=True)
                    return results
                stopped = waiting[len(answers) - 1]
                await self.count(asks[stopped].checks[-answers[-1] - 1])
                waiting = waiting[len(answers) - 1 :]
        except _UNAVAILABLE as exc:
            self._mark(up=False, reason=exc)
            if settled != b"[]":
                self._lost(settling)
            raise StoreUnavailableError("the budget store is unavailable; retry shortly") from None
        raise StoreUnavailableError("the budget store keeps losing its counters")

    async def count(self, check: BudgetCheck) -> None:
        """Rebuild a scope's counters: its spending this period from the ledger."""
        spent = await asyncio.to_thread(self._spent, check.scope, check.period_start_ms)
        b, _, a = self._keys(check)
        await self._init(keys=[b, a], args=[spent.micros, spent.tokens, _KEEP_S])

    async def _forget_stale(self) -> None:
        """Drop the counters that missed a settle and the leases in an unknown state, at once
        (the counters are then rebuilt from the ledger and the open reservations)."""
        if self._stale or self._dropped:
            stale, self._stale = self._stale, set()
            dropped, self._dropped = self._dropped, set()
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for r, a in dropped:
                        pipe.zrem(r, self.lease_id)
                        pipe.hdel(a, self.lease_id)
                    if stale:
                        pipe.delete(*stale)
                    await pipe.execute()
            except BaseException:
                self._stale |= stale
                self._dropped |= dropped
                raise

    async def lease(
        self, changes: list[LeaseChange], hold_s: float, share: int
    ) -> list[LeaseAnswer]:
        """Apply this gateway's lease changes (see `redis_scripts.LEASE`); the leases expire
        `hold_s` plus the margin from now unless called again. Raises `StoreUnavailableError`."""
        index, keys = self._scopes(c.check for c in changes)
        expiry = int(time.time() * 1000) + int(hold_s * 1000) + self._margin_ms
        payload = [
            [
                index[c.check.scope, c.check.period_start_ms],
                str(c.spent.micros),
                str(c.spent.tokens),
                str(c.keep.micros),
                str(c.keep.tokens),
                str(c.want.micros),
                str(c.want.tokens),
                -1 if c.check.limit_micros is None else c.check.limit_micros,
                -1 if c.check.limit_tokens is None else c.check.limit_tokens,
            ]
            for c in changes
        ]
        try:
            await self._forget_stale()
            raw = await self._lease(
                keys=keys, args=[expiry, _KEEP_S, self.lease_id, share, _encode(payload)]
            )
        except _UNAVAILABLE as exc:
            self._mark(up=False, reason=exc)
            raise StoreUnavailableError("the budget store is unavailable; retry shortly") from None
        self._mark(up=True)
        return [LeaseAnswer(Amount(int(m), int(t)), int(f) == 1, int(f) == 2) for m, t, f in raw]

    def forget_lease(self, check: BudgetCheck) -> None:
        b, r, a = self._keys(check)
        self._stale.add(b)
        self._dropped.add((r, a))

    def settle_many(self, settlements: list[Settlement]) -> None:
        """Give back the reservations and count what was spent: with the next reservations
        (one call for both), or on their own after `settle_delay_s` without any."""
        self._pending += settlements
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._settle_delay_s, self._flush_settlements)

    def _flush_settlements(self, *, now: bool = False) -> None:
        self._timer = None
        if self._pending and (self._reserving or self._tasks) and not now:
            # Reservations are on their way (the call after them takes these along), or a
            # settle call is: one at a time, so a slow Redis does not use up the connections.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._settle_delay_s, self._flush_settlements)
            return
        if self._pending:
            settling, self._pending = self._pending, []
            task = asyncio.get_running_loop().create_task(self._settle_now(settling))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle_now(self, settlements: list[Settlement]) -> None:
        index, keys = self._scopes(c for s in settlements for c in s.checks)
        try:
            await self._settle(keys=keys, args=[_encode(_settlements(settlements, index))])
        except _UNAVAILABLE as exc:
            self._mark(up=False, reason=exc)
            self._lost(settlements)

    def _lost(self, settlements: list[Settlement]) -> None:
        """The ledger has these entries; the counters are rebuilt from it once Redis is back."""
        self._stale.update(self._keys(c)[0] for s in settlements for c in s.checks)

    def _mark(self, *, up: bool, reason: BaseException | None = None) -> None:
        if up != self.up:
            if up:
                log.warning("budget store (Redis) is back")
            else:
                log.warning("budget store (Redis) unavailable: %s", type(reason).__name__)
        self.up = up

    async def drain(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._flush_settlements(now=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self._redis.aclose(close_connection_pool=True)


def _settlements(settlements: list[Settlement], index: dict[tuple[str, int], int]) -> list[Any]:
    return [
        {
            "id": s.request_id,
            "m": str(s.actual.micros),
            "t": str(s.actual.tokens),
            "s": [index[c.scope, c.period_start_ms] for c in s.checks],
        }
        for s in settlements
    ]
