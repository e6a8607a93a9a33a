"""Budget reservations in the real Redis: atomic across replicas, crash-safe, outage modes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis

from grifo.admission.budgets import Budgets
from grifo.config.model import BudgetConfig, OutagePolicy
from grifo.errors import StoreUnavailableError
from grifo.security.keys import Principal
from grifo.store.records import Amount, Ask, BudgetCheck, Settlement
from grifo.store.redis_budgets import RedisReservations
from tests.support.stores import REDIS_URL, TcpRelay

STRICT = BudgetCheck("tenant:acme", 0, 1000, True)


NOTHING = Amount(0, 0)


def _ledger(amount: Amount = NOTHING) -> Callable[[str, int], Amount]:
    return lambda scope, since_ms: amount


async def reserve(
    store: RedisReservations, checks: list[BudgetCheck], worst: Amount, rid: str, hold_s: float
) -> BudgetCheck | None:
    return (await store.reserve_many([Ask(checks, worst, rid, hold_s)]))[0]


def settle(
    store: RedisReservations, checks: list[BudgetCheck], rid: str, reserved: Amount, actual: Amount
) -> None:
    store.settle_many([Settlement(checks, rid, reserved, actual)])


def _counters(prefix: str, check: BudgetCheck) -> dict[str, int]:
    client = redis.Redis.from_url(REDIS_URL)
    raw = client.hgetall(f"{prefix}:b:{check.scope}:{check.period_start_ms}")
    client.close()
    return {k.decode(): int(v) for k, v in raw.items()}


def test_replicas_racing_for_the_last_cent_never_overspend(redis_prefix: str) -> None:
    async def scenario() -> None:
        replicas = [  # few connections each: requests beyond them wait, never fail
            RedisReservations(REDIS_URL, _ledger(), prefix=redis_prefix, max_connections=4)
            for _ in range(3)
        ]
        worst = Amount(100, 10)
        results = await asyncio.gather(
            *(reserve(replicas[i % 3], [STRICT], worst, f"req-{i}", hold_s=30) for i in range(100))
        )
        admitted = [i for i, refused in enumerate(results) if refused is None]
        assert len(admitted) == 10, "1000 micro-USD hold exactly ten 100-micro worst cases"
        assert all(r == STRICT for r in results if r is not None)
        for i in admitted:
            settle(replicas[i % 3], [STRICT], f"req-{i}", worst, Amount(60, 6))
        for replica in replicas:
            await replica.drain()
        assert _counters(redis_prefix, STRICT) == {"rm": 0, "rt": 0, "sm": 600, "st": 60}
        more = await asyncio.gather(
            *(reserve(replicas[0], [STRICT], worst, f"more-{i}", 30) for i in range(10))
        )
        assert sum(r is None for r in more) == 4, "600 spent: four more fit, exactly"
        for replica in replicas:
            await replica.close()

    asyncio.run(scenario())


def test_one_batch_decides_its_asks_in_order(redis_prefix: str) -> None:
    async def scenario() -> None:
        store = RedisReservations(REDIS_URL, _ledger(), prefix=redis_prefix)
        key = BudgetCheck("key:k1", 0, 250, True)
        asks = [
            Ask([STRICT, key] if i % 2 else [STRICT], Amount(100, 1), f"r{i}", 30)
            for i in range(20)
        ]
        try:
            results = await store.reserve_many(asks)
            assert results[:6] == [None, None, None, None, None, key], "key: 250 holds two"
            reserved = [a for a, r in zip(asks, results, strict=True) if r is None]
            assert [a.request_id for a in reserved] == [
                f"r{i}" for i in (0, 1, 2, 3, 4, 6, 8, 10, 12, 14)
            ]
            assert results[15:] == [STRICT] * 5, "1000 micro-USD: ten reserved, in order"
            assert _counters(redis_prefix, key)["rm"] == 200
            settled = [Settlement(a.checks, a.request_id, a.worst, Amount(1, 0)) for a in reserved]
            store.settle_many(settled)
            await store.drain()
            assert _counters(redis_prefix, STRICT) == {"rm": 0, "rt": 0, "sm": 10, "st": 0}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_soft_budgets_admit_while_under_and_tokens_count_too(redis_prefix: str) -> None:
    async def scenario() -> None:
        store = RedisReservations(REDIS_URL, _ledger(), prefix=redis_prefix)
        soft = BudgetCheck("key:k1", 0, 1000, False)
        assert await reserve(store, [soft], Amount(900, 0), "a", 30) is None
        assert await reserve(store, [soft], Amount(900, 0), "b", 30) is None, "soft: still under"
        assert await reserve(store, [soft], Amount(1, 0), "c", 30) == soft, "now over"
        tokens = BudgetCheck("tenant:t", 0, None, True, 50)
        assert await reserve(store, [tokens], Amount(10**9, 51), "d", 30) == tokens
        assert await reserve(store, [tokens], Amount(10**9, 50), "e", 30) is None
        both = [STRICT, tokens]
        assert await reserve(store, both, Amount(1, 1), "f", 30) == tokens
        assert _counters(redis_prefix, STRICT)["rm"] == 0, "a refused pair reserves nothing"
        await store.close()

    asyncio.run(scenario())


def test_spending_is_counted_from_the_ledger_first(redis_prefix: str) -> None:
    async def scenario() -> None:
        store = RedisReservations(REDIS_URL, _ledger(Amount(950, 0)), prefix=redis_prefix)
        assert await reserve(store, [STRICT], Amount(51, 0), "a", 30) == STRICT
        assert await reserve(store, [STRICT], Amount(50, 0), "b", 30) is None
        await store.close()

    asyncio.run(scenario())


def test_a_dead_gateways_reservation_expires(redis_prefix: str) -> None:
    async def scenario() -> None:
        dead = RedisReservations(REDIS_URL, _ledger(), prefix=redis_prefix, margin_s=0)
        assert await reserve(dead, [STRICT], Amount(1000, 0), "orphan", hold_s=0.5) is None
        live = RedisReservations(REDIS_URL, _ledger(), prefix=redis_prefix)
        assert await reserve(live, [STRICT], Amount(1, 0), "a", 30) == STRICT
        await asyncio.sleep(0.6)
        assert await reserve(live, [STRICT], Amount(1000, 0), "b", 30) is None, "given back"
        assert _counters(redis_prefix, STRICT)["rm"] == 1000
        await dead.close()
        await live.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("mode", "policy", "admitted"),
    [
        ("strict", "auto", False),
        ("soft", "auto", True),
        ("soft", "fail-closed", False),
        ("strict", "fail-open", True),
    ],
)
def test_redis_down_fails_closed_or_open(
    redis_prefix: str, mode: str, policy: OutagePolicy, admitted: bool
) -> None:
    relay = TcpRelay("127.0.0.1", 6379)

    async def scenario() -> None:
        store = RedisReservations(relay.url(REDIS_URL), _ledger(), prefix=redis_prefix)
        budget = BudgetConfig(usd=1.0, mode="strict" if mode == "strict" else "soft")
        budgets = Budgets(store, _NoSpend(), {"acme": budget}, {}, 10.0, policy)
        relay.cut()
        principal = Principal("acme", "k", None)
        from grifo.wire import requests as wire

        body = wire.decode_for("/v1/completions", b'{"model": "m", "prompt": "hi"}')
        if admitted:
            reservation = await budgets.reserve(principal, body, [], "req-1", 1.0)
            assert not reservation.open
            assert budgets.unchecked == 1
            assert not budgets.store_up
        else:
            with pytest.raises(StoreUnavailableError):
                await budgets.reserve(principal, body, [], "req-1", 1.0)
            assert budgets.unchecked == 0
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        relay.cut()


def test_a_settle_lost_in_an_outage_is_recounted_from_the_ledger(redis_prefix: str) -> None:
    relay = TcpRelay("127.0.0.1", 6379)
    ledger = [Amount(0, 0)]

    async def scenario() -> None:
        store = RedisReservations(
            relay.url(REDIS_URL), lambda scope, since: ledger[0], prefix=redis_prefix
        )
        assert await reserve(store, [STRICT], Amount(500, 5), "a", 30) is None
        relay.cut()
        settle(store, [STRICT], "a", Amount(500, 5), Amount(300, 3))
        await store.drain()
        assert not store.up
        ledger[0] = Amount(300, 3)  # the ledger got the entry meanwhile
        relay.restore()
        assert await reserve(store, [STRICT], Amount(700, 0), "b", 30) == STRICT, (
            "the lost settle's reservation is still held until it expires"
        )
        assert store.up
        counters = _counters(redis_prefix, STRICT)
        assert (counters["sm"], counters["st"]) == (300, 3), "spending recounted"
        assert counters["rm"] == 500
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        relay.cut()


class _NoSpend:
    def spent_since(self, tenant: str, since_ms: int) -> int:
        return 0
