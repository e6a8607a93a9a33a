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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from grifo.errors import StoreUnavailableError
from grifo.store.records import Amount, BudgetCheck

log = logging.getLogger("grifo.redis")
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_KEEP_S = 40 * 24 * 3600  # counters outlive the longest period (a month)

# Amounts travel as decimal strings and are added by HINCRBY, never through Lua's doubles
# (which would print large ones in exponent form); comparisons in doubles are exact below 2^53.
_GIVE_BACK = """
local function give_back(b, held)
  local m, t = string.match(held, '(%d+) (%d+)')
  if m ~= '0' then redis.call('HINCRBY', b, 'rm', '-' .. m) end
  if t ~= '0' then redis.call('HINCRBY', b, 'rt', '-' .. t) end
end
"""

_RESERVE = (
    _GIVE_BACK
    + """
local now, expires, rid = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local wm, wt = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS / 3
for i = 0, n - 1 do
  local b, r, a = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  if redis.call('EXISTS', b) == 0 then return -(i + 1) end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', r, '-inf', now)) do
    local held = redis.call('HGET', a, id)
    if held then
      give_back(b, held)
      redis.call('HDEL', a, id)
    end
    redis.call('ZREM', r, id)
  end
end
for i = 0, n - 1 do
  local v = redis.call('HMGET', KEYS[3 * i + 1], 'rm', 'rt', 'sm', 'st')
  local lm, lt = tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i])
  local strict = ARGV[8 + 3 * i] == '1'
  local cm = tonumber(v[1] or 0) + tonumber(v[3] or 0)
  local ct = tonumber(v[2] or 0) + tonumber(v[4] or 0)
  if lm >= 0 and cm + (strict and wm or 1) > lm then return i + 1 end
  if lt >= 0 and ct + (strict and wt or 1) > lt then return i + 1 end
end
for i = 0, n - 1 do
  local b, r, a = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  redis.call('HINCRBY', b, 'rm', ARGV[4])
  redis.call('HINCRBY', b, 'rt', ARGV[5])
  redis.call('ZADD', r, expires, rid)
  redis.call('HSET', a, rid, ARGV[4] .. ' ' .. ARGV[5])
  redis.call('EXPIRE', r, ARGV[#ARGV])
  redis.call('EXPIRE', a, ARGV[#ARGV])
end
return 0
"""
)

_SETTLE = (
    _GIVE_BACK
    + """
local rid = ARGV[1]
for i = 0, #KEYS / 3 - 1 do
  local b, r, a = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  if redis.call('EXISTS', b) == 1 then
    if redis.call('ZREM', r, rid) == 1 then
      local held = redis.call('HGET', a, rid)
      if held then give_back(b, held) end
      redis.call('HDEL', a, rid)
    end
    redis.call('HINCRBY', b, 'sm', ARGV[2])
    redis.call('HINCRBY', b, 'st', ARGV[3])
  end
end
return 0
"""
)

# Counters of a scope seen for the first time: spending from the ledger, reservations from the
# open ones (still there when only the counters were lost). The first replica to get here wins.
_INIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local rm, rt = 0, 0
for _, held in ipairs(redis.call('HVALS', KEYS[2])) do
  local m, t = string.match(held, '(%d+) (%d+)')
  rm, rt = rm + tonumber(m), rt + tonumber(t)
end
redis.call('HSET', KEYS[1], 'rm', string.format('%.0f', rm), 'rt', string.format('%.0f', rt),
  'sm', ARGV[1], 'st', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


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
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._init = self._redis.register_script(_INIT)
        self._stale: set[str] = set()  # counters that missed a settle while Redis was away
        self._tasks: set[asyncio.Task[None]] = set()
        self.up = True

    def _keys(self, check: BudgetCheck) -> list[str]:
        tail = f"{check.scope}:{check.period_start_ms}"
        return [f"{self._prefix}:{part}:{tail}" for part in ("b", "r", "a")]

    async def reserve(
        self, checks: list[BudgetCheck], worst: Amount, request_id: str, hold_s: float
    ) -> BudgetCheck | None:
        """Reserve `worst` in every scope, or nothing: returns the first check that refused.
        Raises `StoreUnavailableError` when Redis does not answer."""
        keys = [k for check in checks for k in self._keys(check)]
        now_ms = int(time.time() * 1000)
        args: list[int | str] = [
            now_ms,
            now_ms + int(hold_s * 1000) + self._margin_ms,
            request_id,
            worst.micros,
            worst.tokens,
        ]
        for check in checks:
            args += [
                -1 if check.limit_micros is None else check.limit_micros,
                -1 if check.limit_tokens is None else check.limit_tokens,
                int(check.strict),
            ]
        args.append(_KEEP_S)
        try:
            await self._forget_stale()
            for _ in range(len(checks) + 1):
                result = int(await self._reserve(keys=keys, args=args))
                if result >= 0:
                    self._mark(up=True)
                    return None if result == 0 else checks[result - 1]
                await self._count(checks[-result - 1])
        except _UNAVAILABLE as exc:
            self._mark(up=False, reason=exc)
            raise StoreUnavailableError("the budget store is unavailable; retry shortly") from None
        raise StoreUnavailableError("the budget store keeps losing its counters")

    async def _count(self, check: BudgetCheck) -> None:
        """Rebuild a scope's counters: its spending this period from the ledger."""
        spent = await asyncio.to_thread(self._spent, check.scope, check.period_start_ms)
        b, _, a = self._keys(check)
        await self._init(keys=[b, a], args=[spent.micros, spent.tokens, _KEEP_S])

    async def _forget_stale(self) -> None:
        if self._stale:
            stale, self._stale = self._stale, set()
            await self._redis.delete(*stale)

    def settle(
        self, checks: list[BudgetCheck], request_id: str, reserved: Amount, actual: Amount
    ) -> None:
        """Give back the reservation and count what was spent (in the background)."""
        del reserved  # Redis knows what each reservation holds
        task = asyncio.get_running_loop().create_task(self._settle_now(checks, request_id, actual))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_now(self, checks: list[BudgetCheck], request_id: str, actual: Amount) -> None:
        keys = [k for check in checks for k in self._keys(check)]
        try:
            await self._settle(keys=keys, args=[request_id, actual.micros, actual.tokens])
        except _UNAVAILABLE as exc:
            self._mark(up=False, reason=exc)
            # The ledger has the entry; the counters are rebuilt from it once Redis is back.
            self._stale.update(self._keys(check)[0] for check in checks)

    def _mark(self, *, up: bool, reason: BaseException | None = None) -> None:
        if up != self.up:
            if up:
                log.warning("budget store (Redis) is back")
            else:
                log.warning("budget store (Redis) unavailable: %s", type(reason).__name__)
        self.up = up

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self._redis.aclose(close_connection_pool=True)
