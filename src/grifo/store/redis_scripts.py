"""The Lua scripts behind `redis_budgets.py`: each runs atomically in Redis.

Keys per budget scope and period: `b` (counters: reserved and spent micro-USD `rm`/`sm` and
tokens `rt`/`st`), `r` (open reservations by expiry) and `a` (what each holds, "<m> <t>"); see
`redis_budgets.py`.
"""

# Amounts travel as decimal strings and are added by HINCRBY, never through Lua's doubles
# (which would print large ones in exponent form); comparisons in doubles are exact below 2^53.
GIVE_BACK = """
local function give_back(b, held)
  local m, t = string.match(held, '(%d+) (%d+)')
  if m ~= '0' then redis.call('HINCRBY', b, 'rm', '-' .. m) end
  if t ~= '0' then redis.call('HINCRBY', b, 'rt', '-' .. t) end
end

-- settlements: request id `id`, spent `m`/`t` (strings), scope indices `s`
local function settle_all(settlements)
  for _, x in ipairs(settlements) do
    for _, i in ipairs(x.s) do
      local b, r, a = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
      if redis.call('EXISTS', b) == 1 then
        if redis.call('ZREM', r, x.id) == 1 then
          local held = redis.call('HGET', a, x.id)
          if held then give_back(b, held) end
          redis.call('HDEL', a, x.id)
        end
        redis.call('HINCRBY', b, 'sm', x.m)
        redis.call('HINCRBY', b, 'st', x.t)
      end
    end
  end
end
"""

# One call settles what finished since the last call (ARGV[4], see settle_all), then decides a
# batch of asks in order. KEYS: the (b, r, a) keys of every scope in the call; ARGV: now (ms),
# counter lifetime (s), the asks as JSON: request id `id`, expiry
# `e`, worst case `m`/`t` (strings), checks `c` = [scope index, micro-USD limit, token limit,
# strict] (-1: no limit). Per ask: 0 reserved, j refused by its check j, -j check j has no
# counters yet: the answer stops there, to be asked again from that ask once they are counted
# from the ledger, so asks are always decided in order.
RESERVE = (
    GIVE_BACK
    + """
settle_all(cjson.decode(ARGV[4]))
local now, keep = tonumber(ARGV[1]), ARGV[2]
local swept, out = {}, {}
for n, ask in ipairs(cjson.decode(ARGV[3])) do
  local result = 0
  for j, c in ipairs(ask.c) do
    local s = c[1] * 3
    local b = KEYS[s + 1]
    if redis.call('EXISTS', b) == 0 then
      out[n] = -j
      return out
    end
    if not swept[s] then
      swept[s] = true
      local r, a = KEYS[s + 2], KEYS[s + 3]
      for _, id in ipairs(redis.call('ZRANGEBYSCORE', r, '-inf', now)) do
        local held = redis.call('HGET', a, id)
        if held then give_back(b, held); redis.call('HDEL', a, id) end
        redis.call('ZREM', r, id)
      end
    end
  end
  if result == 0 then
    local wm, wt = tonumber(ask.m), tonumber(ask.t)
    for j, c in ipairs(ask.c) do
      local v = redis.call('HMGET', KEYS[c[1] * 3 + 1], 'rm', 'rt', 'sm', 'st')
      local cm = tonumber(v[1] or 0) + tonumber(v[3] or 0)
      local ct = tonumber(v[2] or 0) + tonumber(v[4] or 0)
      local strict = c[4] == 1
      if (c[2] >= 0 and cm + (strict and wm or 1) > c[2])
          or (c[3] >= 0 and ct + (strict and wt or 1) > c[3]) then
        result = j
        break
      end
    end
  end
  if result == 0 then
    for _, c in ipairs(ask.c) do
      local s = c[1] * 3
      redis.call('HINCRBY', KEYS[s + 1], 'rm', ask.m)
      redis.call('HINCRBY', KEYS[s + 1], 'rt', ask.t)
      redis.call('ZADD', KEYS[s + 2], ask.e, ask.id)
      redis.call('HSET', KEYS[s + 3], ask.id, ask.m .. ' ' .. ask.t)
      redis.call('EXPIRE', KEYS[s + 2], keep)
      redis.call('EXPIRE', KEYS[s + 3], keep)
    end
  end
  out[n] = result
end
return out
"""
)

SETTLE = GIVE_BACK + "settle_all(cjson.decode(ARGV[1]))\nreturn 0\n"

# Counters of a scope seen for the first time: spending from the ledger, reservations from the
# open ones (still there when only the counters were lost). The first replica to get here wins.
INIT = """
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


# One call per gateway for all its leases. KEYS: the (b, r, a) keys of every scope; ARGV: the
# leases' expiry (ms), counter lifetime (s), lease id, share, the changes as JSON: [scope index,
# spent m, spent t, keep m, keep t, want m, want t (strings), limit m, limit t (-1: none)].
# Spending moves from the lease (what it still holds: an expired one was given back) to the
# spent counters; the lease shrinks to `keep`, then grows to `want` if the scope keeps room for
# `share` more leases that size. Per lease: {held m, held t, 0 | 1 could not grow | 2 the scope
# has no counters (nothing was changed)}.
LEASE = """
local function add(b, field, v)
  if v ~= 0 then redis.call('HINCRBY', b, field, string.format('%.0f', v)) end
end
local expiry, keep_s, id, share = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {}
for n, x in ipairs(cjson.decode(ARGV[5])) do
  local s = x[1] * 3
  local b, r, a = KEYS[s + 1], KEYS[s + 2], KEYS[s + 3]
  local hm, ht = 0, 0
  local held = redis.call('HGET', a, id)
  if held then
    local m, t = string.match(held, '(%d+) (%d+)')
    hm, ht = tonumber(m), tonumber(t)
  end
  if redis.call('EXISTS', b) == 0 then
    out[n] = {string.format('%.0f', hm), string.format('%.0f', ht), 2}
  else
    local spent_m, spent_t = tonumber(x[2]), tonumber(x[3])
    local dm, dt = math.min(spent_m, hm), math.min(spent_t, ht)
    add(b, 'sm', spent_m)
    add(b, 'st', spent_t)
    hm, ht = hm - dm, ht - dt
    local nm, nt = math.min(hm, tonumber(x[4])), math.min(ht, tonumber(x[5]))
    local wm, wt = tonumber(x[6]), tonumber(x[7])
    local tight = 0
    if wm > nm or wt > nt then
      local v = redis.call('HMGET', b, 'rm', 'rt', 'sm', 'st')
      -- free room, counting what the lease gives back (its old hold is reserved in rm)
      local fm = x[8] - (tonumber(v[1] or 0) - dm + tonumber(v[3] or 0)) + (hm - nm)
      local ft = x[9] - (tonumber(v[2] or 0) - dt + tonumber(v[4] or 0)) + (ht - nt)
      local gm, gt = math.max(wm, nm), math.max(wt, nt)
      local fits_m = x[8] < 0 or fm - (gm - nm) >= share * gm
      if fits_m and (x[9] < 0 or ft - (gt - nt) >= share * gt) then
        nm, nt = gm, gt
      else
        tight = 1
      end
    end
    add(b, 'rm', nm - hm - dm)
    add(b, 'rt', nt - ht - dt)
    if nm == 0 and nt == 0 then
      redis.call('HDEL', a, id)
      redis.call('ZREM', r, id)
    else
      redis.call('HSET', a, id, string.format('%.0f %.0f', nm, nt))
      redis.call('ZADD', r, expiry, id)
      redis.call('EXPIRE', r, keep_s)
      redis.call('EXPIRE', a, keep_s)
    end
    out[n] = {string.format('%.0f', nm), string.format('%.0f', nt), tight}
  end
end
return out
"""
