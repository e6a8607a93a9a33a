"""Cost of one request in integer micro-USD.

cost = ceil(((prompt - cached) × input_per_1m + cached × cached_input_per_1m
            + completion × output_per_1m) / 10^6)
     + ceil(usd_per_hour_micros × busy_ns / 3.6·10^12)

Prices are micro-USD per million tokens; `busy_ns` is the request's share of the point's busy
time (dispatch to last byte, divided among the requests in flight at the point at each moment:
see `sharing.py`), so a batched request does not pay the whole hour. Each part rounds up to a
whole micro-USD, so a request that used the point is never free and no float touches money.
"""

from __future__ import annotations

from grifo.topology import Price

_NS_PER_HOUR = 3_600_000_000_000


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def token_cost_micros(
    price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> int:
    """`cached_tokens` of the prompt came from the engine's prefix cache (their own price)."""
    cached = 0 if cached_tokens < 0 else cached_tokens  # not min/max: see usage._clamp
    cached = cached if cached < prompt_tokens else prompt_tokens
    cached_rate = price.cached_input_micros_per_1m
    if cached_rate is None:
        cached_rate = price.input_micros_per_1m
    total = (
        (prompt_tokens - cached) * price.input_micros_per_1m
        + cached * cached_rate
        + completion_tokens * price.output_micros_per_1m
    )
    return _ceil_div(total, 1_000_000)


def hardware_cost_micros(usd_per_hour_micros: int, busy_ns: int) -> int:
    return _ceil_div(usd_per_hour_micros * busy_ns, _NS_PER_HOUR) if busy_ns > 0 else 0


def cost_micros(
    price: Price,
    usd_per_hour_micros: int,
    prompt_tokens: int,
    completion_tokens: int,
    busy_ns: int,
    cached_tokens: int = 0,
) -> int:
    tokens = token_cost_micros(price, prompt_tokens, completion_tokens, cached_tokens)
    return tokens + hardware_cost_micros(usd_per_hour_micros, busy_ns)
