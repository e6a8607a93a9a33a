"""Rate limits shared by gateway replicas, in Redis: the same buckets as `admission/ratelimit.py`,
decided by one Lua script per batch so replicas draw from one allowance.

Per scope (`tenant:<name>` or `key:<id>`): `<prefix>:l:<scope>` holds the request and token
buckets (`rl`, `ra`, `tl`, `ta`: level and time of the last refill, in ms) and
`<prefix>:c:<scope>` the requests running, a sorted set of request ids by expiry (a crashed
gateway's requests stop counting when their deadline has passed).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from grifo.errors import StoreUnavailableError

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_encode = msgspec.json.Encoder().encode

# ARGV[1] now (ms); ARGV[2] the asks as JSON: request id `id`, expiry `e`, tokens `t`, scopes
# `s` = [[index, requests/min or -1, tokens/min or -1, concurrent or -1], ...]; ARGV[3] the
# finished ones: [[request id, token refund (may be negative), [scope indices]], ...]. KEYS: the
# (l, c) keys of each scope. Per ask: 0 admitted, else 1 + the index (in its scopes) of the
# limit that refused it, and the seconds to wait.
_SCRIPT = """
local now = tonumber(ARGV[1])
local function refill(key, level_f, at_f, per_min)
  local v = redis.call('HMGET', key, level_f, at_f)
  local level, at = tonumber(v[1]), tonumber(v[2])
  if level == nil then return per_min end
  return math.min(per_min, level + (now - at) * per_min / 60000)
end
for _, done in ipairs(cjson.decode(ARGV[3])) do
  for _, i in ipairs(done[3]) do
    local l, c = KEYS[i * 2 + 1], KEYS[i * 2 + 2]
    redis.call('ZREM', c, done[1])
    local level = tonumber(redis.call('HGET', l, 'tl'))
    local cap = tonumber(redis.call('HGET', l, 'tc'))
    if level ~= nil and cap ~= nil then
      redis.call('HSET', l, 'tl', math.min(cap, level + done[2]))
    end
  end
end
local out = {}
for n, ask in ipairs(cjson.decode(ARGV[2])) do
  local refused, wait = 0, 0
  local levels = {}
  for j, s in ipairs(ask.s) do
    local l, c = KEYS[s[1] * 2 + 1], KEYS[s[1] * 2 + 2]
    redis.call('ZREMRANGEBYSCORE', c, '-inf', now)
    local rl = s[2] >= 0 and refill(l, 'rl', 'ra', s[2]) or nil
    local tl = s[3] >= 0 and refill(l, 'tl', 'ta', s[3]) or nil
    levels[j] = {rl, tl}
    if s[4] >= 0 and redis.call('ZCARD', c) >= s[4] then refused, wait = j, 1000; break end
    if rl ~= nil and rl < 1 then refused, wait = j, (1 - rl) * 60000 / s[2]; break end
    if tl ~= nil and tl < ask.t then
      refused = j
      wait = ask.t > s[3] and -1 or (ask.t - tl) * 60000 / s[3]
      break
    end
  end
  if refused == 0 then
    for j, s in ipairs(ask.s) do
      local l, c = KEYS[s[1] * 2 + 1], KEYS[s[1] * 2 + 2]
      if levels[j][1] ~= nil then redis.call('HSET', l, 'rl', levels[j][1] - 1, 'ra', now) end
      if levels[j][2] ~= nil then
        redis.call('HSET', l, 'tl', levels[j][2] - ask.t, 'ta', now, 'tc', s[3])
      end
      if s[4] >= 0 then redis.call('ZADD', c, ask.e, ask.id) end
      redis.call('EXPIRE', l, 3600)
      redis.call('EXPIRE', c, 3600)
    end
  end
  out[n] = {refused, math.floor(wait)}
end
return out
"""


class RedisLimiter:
    """Decides batches of asks against shared buckets; see `admission/ratelimit.SharedLimits`."""

    def __init__(self, url: str, *, prefix: str = "grifo", timeout_s: float = 0.5) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(_SCRIPT)
        self._prefix = prefix

    async def decide(
        self,
        scopes: list[str],
        asks: list[dict[str, Any]],
        finished: list[tuple[str, int, list[int]]],
    ) -> list[tuple[int, float]]:
        """Per ask (refusing scope position, 0 if admitted; seconds to wait, -1: never)."""
        keys = [f"{self._prefix}:{kind}:{scope}" for scope in scopes for kind in ("l", "c")]
        args: list[int | bytes] = [int(time.time() * 1000), _encode(asks), _encode(finished)]
        try:
            raw = await self._script(keys=keys, args=args)
        except _UNAVAILABLE:
            raise StoreUnavailableError("the rate limit store is unavailable") from None
        return [(int(r[0]), int(r[1]) / 1000 if int(r[1]) >= 0 else -1.0) for r in raw]

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)
