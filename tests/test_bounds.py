"""The request path's clamps and caps are conditionals rather than min()/max() calls (those
parse keywords on every call on Python 3.11): each still equals the min/max it stands for."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from grifo.admission.ratelimit import Bucket
from grifo.config.model import PointConfig
from grifo.metering.pricing import hardware_cost_micros, token_cost_micros
from grifo.metering.sharing import BusyClock
from grifo.metering.usage import _MAX_TOKENS, _clamp
from grifo.topology import Price, build_point_state

counts = st.integers(-(10**12), 10**12)


@given(counts)
def test_token_counts_are_clamped_to_zero_and_the_maximum(n: int) -> None:
    assert _clamp(n) == min(max(n, 0), _MAX_TOKENS)


@given(counts, st.integers(0, 10**9), st.integers(0, 10**6), st.integers(0, 10**6))
def test_cached_tokens_count_between_zero_and_the_prompt(
    cached: int, prompt: int, input_rate: int, cached_rate: int
) -> None:
    price = Price(input_rate, 0, cached_rate)
    billed = min(max(cached, 0), prompt)
    expected = Fraction((prompt - billed) * input_rate + billed * cached_rate, 1_000_000)
    assert token_cost_micros(price, prompt, 0, cached) == math.ceil(expected)


@given(st.integers(0, 10**9), counts)
def test_no_hardware_cost_for_no_busy_time(per_hour: int, busy_ns: int) -> None:
    expected = Fraction(per_hour * max(busy_ns, 0), 3_600_000_000_000)
    assert hardware_cost_micros(per_hour, busy_ns) == math.ceil(expected)


@given(st.floats(1, 1e12), st.floats(0, 1e9), st.floats(-1e12, 1e12), st.floats(0, 1e6))
def test_a_bucket_refills_up_to_its_capacity(
    capacity: float, per_s: float, level: float, elapsed_s: float
) -> None:
    bucket, now = Bucket(capacity, per_s, level, 100.0), 100.0 + elapsed_s
    bucket.refill(now)
    assert bucket.level == min(capacity, level + (now - 100.0) * per_s)
    assert bucket.at == now


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_a_points_running_and_queued_counts(
    point_running: int, point_queued: int, finished: int, ours: int
) -> None:
    config = PointConfig(name="lima", site="lima", region="r", jurisdiction="PE", tier="edge")
    point = build_point_state(config, "http://127.0.0.1:1")
    point.point_in_flight, point.point_queued = point_running, point_queued
    point.finished_since_poll, point.gateway_in_flight = finished, ours
    assert point.running == max(point_running - finished, ours)
    assert point.queued == max(point_queued - max(finished - point_running, 0), 0)


@given(st.lists(st.tuples(st.booleans(), st.integers(-5, 1_000)), max_size=40))
def test_the_busy_clock_shares_time_as_max_and_clamps_would(steps: list[tuple[bool, int]]) -> None:
    """Against the clock written with max(): time never runs backwards, the count never
    below zero."""
    clock, shared, last, n, now = BusyClock(), 0.0, 0, 0, 0
    marks: list[float] = []
    for enter, delta in steps:
        now += delta
        if n > 0 and now > last:
            shared += (now - last) / n
        last = max(last, now)
        if enter:
            assert clock.enter(now) == shared
            marks.append(shared)
            n += 1
        else:  # with no request in, an unmatched leave: the count stays at zero
            mark = marks.pop() if marks else 0.0
            assert clock.leave(mark, now) == round(shared - mark)
            n = max(n - 1, 0)
        assert clock.in_flight == n
