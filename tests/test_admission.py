"""Admission control: learned concurrency limits, priority and fair queuing, shedding."""

from __future__ import annotations

import asyncio

import pytest

from grifo.admission.shedding import Admission, GradientLimit, request_priority
from grifo.config.model import AdmissionConfig, PointConfig
from grifo.errors import InvalidRequestError, OverloadedError
from grifo.placement.scoring import Candidate
from grifo.topology import PointState, build_point_state


def _points(*names: str) -> list[PointState]:
    points = []
    for i, name in enumerate(names):
        config = PointConfig(name=name, site="s", region="r", jurisdiction="PE", tier="edge")
        point = build_point_state(config, f"http://127.0.0.1:{9000 + i}")
        point.healthy = True
        points.append(point)
    return points


def _candidates(points: list[PointState]) -> list[Candidate]:
    return [Candidate(p, float(i)) for i, p in enumerate(points)]


def _config(**kw: int | float) -> AdmissionConfig:
    defaults: dict[str, int | float] = {"initial_limit": 1, "min_limit": 1, "max_queue": 100}
    return AdmissionConfig(**(defaults | kw))  # type: ignore[arg-type]


def test_a_free_slot_is_taken_at_once_and_its_point_goes_first() -> None:
    async def go() -> None:
        a, b = _points("a", "b")
        admission = Admission(_config(), [a, b])
        first = await admission.enter("t", 1, _candidates([a, b]), 1.0)
        assert [c.point.name for c in first] == ["a", "b"]
        second = await admission.enter("t", 1, _candidates([a, b]), 1.0)
        assert [c.point.name for c in second] == ["b", "a"]  # a is at its limit of 1
        assert admission.limits["a"].in_flight == 1
        assert admission.limits["b"].in_flight == 1

    asyncio.run(go())


async def _fill(admission: Admission, points: list[PointState]) -> None:
    for _ in points:
        await admission.enter("filler", 2, _candidates(points), 1.0)


def test_waiters_are_served_high_priority_first() -> None:
    async def go() -> list[str]:
        (a,) = _points("a")
        admission = Admission(_config(), [a])
        await _fill(admission, [a])
        order: list[str] = []

        async def ask(name: str, priority: int) -> None:
            await admission.enter(name, priority, _candidates([a]), 5.0)
            order.append(name)
            admission.leave("a")

        tasks = [asyncio.ensure_future(ask(n, p)) for n, p in [("low", 0), ("high", 2)]]
        tasks.append(asyncio.ensure_future(ask("normal", 1)))
        await asyncio.sleep(0.01)
        assert admission.waiting == 3
        admission.leave("a")  # the filler is done: the queue drains one at a time
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == ["high", "normal", "low"]


def test_tenants_of_one_priority_take_turns_by_weight() -> None:
    async def go(weights: dict[str, int]) -> list[str]:
        (a,) = _points("a")
        admission = Admission(_config(), [a], weights)
        await _fill(admission, [a])
        order: list[str] = []

        async def ask(tenant: str) -> None:
            await admission.enter(tenant, 1, _candidates([a]), 5.0)
            order.append(tenant)
            await asyncio.sleep(0)
            admission.leave("a")

        # The greedy tenant queues 8 requests before the other one queues 3.
        tasks = [asyncio.ensure_future(ask("greedy")) for _ in range(8)]
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(ask("modest")) for _ in range(3)]
        await asyncio.sleep(0.01)
        admission.leave("a")
        await asyncio.gather(*tasks)
        return order

    fair = asyncio.run(go({}))
    assert fair[:6].count("modest") == 3, fair  # not stuck behind the greedy tenant's 8
    weighted = asyncio.run(go({"greedy": 3}))
    assert weighted.index("modest") >= 1
    assert weighted[:4].count("greedy") >= 2, weighted


def test_a_full_queue_sheds_the_lowest_priority_first() -> None:
    async def go() -> None:
        (a,) = _points("a")
        admission = Admission(_config(max_queue=2), [a])
        await _fill(admission, [a])
        low = [asyncio.ensure_future(admission.enter("t", 0, _candidates([a]), 5.0)) for _ in "xy"]
        await asyncio.sleep(0.01)
        # Another low-priority request finds the queue full: it is the one shed.
        with pytest.raises(OverloadedError) as refused:
            await admission.enter("t", 0, _candidates([a]), 5.0)
        assert refused.value.status == 503
        assert refused.value.retry_after_s is not None
        assert refused.value.retry_after_s >= 1
        # A high-priority one takes the place of the newest low-priority waiter.
        high = asyncio.ensure_future(admission.enter("u", 2, _candidates([a]), 5.0))
        await asyncio.sleep(0.01)
        assert low[1].done()
        assert isinstance(low[1].exception(), OverloadedError)
        admission.leave("a")
        await asyncio.sleep(0.01)
        assert high.done()  # served before the older low-priority waiter
        assert not low[0].done()
        admission.leave("a")
        await low[0]
        assert admission.shed["queue_full"] == 2

    asyncio.run(go())


def test_a_waiter_is_shed_when_its_wait_runs_out() -> None:
    async def go() -> None:
        (a,) = _points("a")
        admission = Admission(_config(max_wait_ms=50), [a])
        await _fill(admission, [a])
        with pytest.raises(OverloadedError, match="waited"):
            await admission.enter("t", 1, _candidates([a]), 5.0)
        assert admission.waiting == 0
        assert admission.shed["waited_too_long"] == 1

    asyncio.run(go())


def test_a_cancelled_waiter_leaves_the_queue_and_holds_no_slot() -> None:
    async def go() -> None:
        (a,) = _points("a")
        admission = Admission(_config(), [a])
        await _fill(admission, [a])
        waiter = asyncio.ensure_future(admission.enter("t", 1, _candidates([a]), 5.0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.waiting == 0
        admission.leave("a")
        assert admission.limits["a"].in_flight == 0

    asyncio.run(go())


def test_the_limit_shrinks_when_answers_slow_down_and_grows_back_when_used() -> None:
    limit = GradientLimit(AdmissionConfig(initial_limit=20, min_limit=2, max_limit=100))
    for _ in range(200):
        limit.observe(0.010, in_flight=20)  # steady: 10 ms per token at full use
    grown = limit.limit
    assert grown > 20
    for _ in range(50):
        limit.observe(0.040, in_flight=int(limit.limit))  # the point queues: 4x slower
    shrunk = limit.limit
    assert shrunk < grown / 2
    for _ in range(50):
        limit.observe(0.010, in_flight=1)  # fast again but hardly used: nothing to learn
    assert limit.limit == pytest.approx(shrunk)
    limit.failed()
    assert limit.limit == pytest.approx(max(2.0, shrunk * 0.9))
    for _ in range(10_000):
        limit.observe(0.040, in_flight=1000)
    assert 2 <= limit.limit <= 100


def test_a_request_may_lower_its_priority_but_not_raise_it() -> None:
    assert request_priority(1, None) == 1
    assert request_priority(1, b"low") == 0
    assert request_priority(1, b"HIGH") == 1
    assert request_priority(2, b"high") == 2
    with pytest.raises(InvalidRequestError):
        request_priority(1, b"urgent")
