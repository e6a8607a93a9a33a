"""Budget leases in the real Redis: reservations without a round trip far from the limit, the
exact budget near it, spending that reaches Redis, leases given back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import redis

from grifo.admission.leases import Lease, Leases
from grifo.admission.reservations import LocalReservations
from grifo.store.records import Amount, Ask, BudgetCheck, Settlement
from grifo.store.redis_budgets import RedisReservations
from grifo.store.sqlite import StateDB
from tests.support.stores import REDIS_URL, TcpRelay

NOTHING = Amount(0, 0)


def _counters(prefix: str, check: BudgetCheck) -> dict[str, int]:
    client = redis.Redis.from_url(REDIS_URL)
    raw = client.hgetall(f"{prefix}:b:{check.scope}:{check.period_start_ms}")
    client.close()
    return {k.decode(): int(v) for k, v in raw.items()}


def _leases_held(prefix: str, check: BudgetCheck) -> dict[str, str]:
    client = redis.Redis.from_url(REDIS_URL)
    raw = client.hgetall(f"{prefix}:a:{check.scope}:{check.period_start_ms}")
    client.close()
    return {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"lease:")}


async def until(condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within 5 s (background work on a busy host)."""
    for _ in range(500):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


class Replica:
    """What `Budgets` does with a lease-holding store, without pricing a request."""

    def __init__(self, prefix: str, url: str = REDIS_URL, **lease_options: int) -> None:
        self.store = RedisReservations(url, lambda scope, since: NOTHING, prefix=prefix)
        self.leases = Leases(self.store, **lease_options)
        self.asked = 0  # reservations that went to Redis

    async def reserve(
        self, checks: list[BudgetCheck], worst: Amount, rid: str
    ) -> tuple[bool, list[Lease] | None]:
        leases = self.leases.take(checks, worst, 30)
        if leases is not None:
            return True, leases
        self.asked += 1
        [refused] = await self.store.reserve_many([Ask(checks, worst, rid, 30)])
        return refused is None, None

    async def settle(
        self,
        checks: list[BudgetCheck],
        rid: str,
        leases: list[Lease] | None,
        worst: Amount,
        actual: Amount,
    ) -> None:
        if leases is not None:
            self.leases.give_back(leases, worst, actual)
        else:
            self.store.settle_many([Settlement(checks, rid, worst, actual)])

    async def close(self) -> None:
        await self.leases.close()
        await self.store.close()


def test_far_from_the_limit_requests_are_reserved_from_the_lease(redis_prefix: str) -> None:
    tenant = BudgetCheck("tenant:acme", 0, 10**9, True, 10**9)
    key = BudgetCheck("key:k1", 0, 10**9, True)
    worst, actual = Amount(100, 10), Amount(40, 4)

    async def scenario() -> None:
        replica = Replica(redis_prefix, requests=64)
        try:
            ok, leases = await replica.reserve([tenant, key], worst, "first")
            assert ok
            assert leases is None, "no lease yet: the first one asks Redis"
            await replica.settle([tenant, key], "first", None, worst, actual)
            lease = {replica.store.lease_id: "6400 640"}  # room for 64 worst cases
            assert await until(lambda: _leases_held(redis_prefix, tenant) == lease)
            assert await until(lambda: _counters(redis_prefix, tenant)["rm"] == 6400), "settled"
            for i in range(200):
                ok, leases = await replica.reserve([tenant, key], worst, f"r{i}")
                assert ok
                await asyncio.sleep(0)
                await replica.settle([tenant, key], f"r{i}", leases, worst, actual)
            assert replica.leases.taken >= 190, "the lease grows again before it runs out"
            assert replica.asked <= 10
            # spending moves from the lease within `flush_s`
            assert await until(lambda: _counters(redis_prefix, tenant)["sm"] == 201 * 40)
            assert _counters(redis_prefix, tenant)["st"] == 201 * 4
            assert _counters(redis_prefix, key)["sm"] == 201 * 40
        finally:
            await replica.close()
        counters = _counters(redis_prefix, tenant)
        assert counters == {"rm": 0, "rt": 0, "sm": 201 * 40, "st": 201 * 4}, "lease given back"
        assert _leases_held(redis_prefix, tenant) == {}

    asyncio.run(scenario())


def test_replicas_leasing_fill_a_strict_budget_exactly_and_never_overrun_it(
    redis_prefix: str,
) -> None:
    """Three replicas spend a budget of 1,000 worst cases at random: leases carry them while it
    is far from the limit, and near it, every replica asks per request until nothing fits."""
    budget = BudgetCheck("tenant:acme", 0, 100_000, True)
    worst = Amount(100, 0)

    async def scenario() -> None:
        replicas = [Replica(redis_prefix, requests=16, share=4, flush_s=0) for _ in range(3)]
        rng = random.Random(7)
        admitted = refused_in_a_row = 0
        running: list[tuple[Replica, str, list[Lease] | None]] = []
        try:
            n = 0
            while refused_in_a_row < 50:
                n += 1
                replica = replicas[rng.randrange(3)]
                ok, leases = await replica.reserve([budget], worst, f"r{n}")
                if ok:
                    admitted += 1
                    refused_in_a_row = 0
                    running.append((replica, f"r{n}", leases))
                else:
                    refused_in_a_row += 1
                    await asyncio.sleep(0.002)  # leases are given back between tries
                assert admitted <= 1000, "strict: never more than fits"
                if len(running) > 8 or (running and rng.random() < 0.3):
                    done, rid, leases = running.pop(rng.randrange(len(running)))
                    await done.settle([budget], rid, leases, worst, worst)
                await asyncio.sleep(0)
            for done, rid, leases in running:
                await done.settle([budget], rid, leases, worst, worst)
            assert sum(r.leases.taken for r in replicas) > 500, "most came from leases"
            assert admitted == 1000, "every cent spent: leases do not strand any"
        finally:
            for replica in replicas:
                await replica.close()
        assert _counters(redis_prefix, budget) == {"rm": 0, "rt": 0, "sm": 100_000, "st": 0}
        assert _leases_held(redis_prefix, budget) == {}

    asyncio.run(scenario())


def test_an_unused_lease_is_given_back(redis_prefix: str) -> None:
    budget = BudgetCheck("tenant:acme", 0, 10**9, True)

    async def scenario() -> None:
        replica = Replica(redis_prefix, requests=10, idle_s=0.2)
        try:
            await replica.reserve([budget], Amount(50, 0), "a")
            lease = {replica.store.lease_id: "500 0"}
            assert await until(lambda: _leases_held(redis_prefix, budget) == lease)
            assert await until(lambda: _leases_held(redis_prefix, budget) == {})
            assert _counters(redis_prefix, budget)["rm"] == 50, "only the request's own"
        finally:
            await replica.close()

    asyncio.run(scenario())


def test_a_dead_gateways_lease_expires(redis_prefix: str) -> None:
    budget = BudgetCheck("tenant:acme", 0, 10_000, True)

    async def scenario() -> None:
        dead = RedisReservations(REDIS_URL, lambda s, t: NOTHING, prefix=redis_prefix, margin_s=0)
        leases = Leases(dead, requests=10, share=1)
        live = Replica(redis_prefix)
        try:
            assert leases.take([budget], Amount(400, 0), 0.3) is None
            await dead.reserve_many([Ask([budget], Amount(400, 0), "a", 0.3)])
            lease = {dead.lease_id: "4000 0"}
            assert await until(lambda: _leases_held(redis_prefix, budget) == lease)
            ok, _ = await live.reserve([budget], Amount(5601, 0), "b")
            assert not ok, "the lease and the request hold 4,400 of 10,000"
            if leases._timer is not None:  # the gateway "dies": no more calls
                leases._timer.cancel()
            await dead.close()
            await asyncio.sleep(0.4)
            ok, _ = await live.reserve([budget], Amount(10_000, 0), "c")
            assert ok, "both expired and were given back"
        finally:
            await live.close()

    asyncio.run(scenario())


def test_a_lease_call_lost_in_an_outage_is_recounted(redis_prefix: str) -> None:
    relay = TcpRelay("127.0.0.1", 6379)
    budget = BudgetCheck("tenant:acme", 0, 10**9, True)
    spent = [NOTHING]

    async def scenario() -> None:
        store = RedisReservations(relay.url(REDIS_URL), lambda s, t: spent[0], prefix=redis_prefix)
        leases = Leases(store, requests=10, flush_s=0)
        try:
            assert leases.take([budget], Amount(100, 0), 30) is None
            taken = None
            for _ in range(100):
                await asyncio.sleep(0.02)
                taken = leases.take([budget], Amount(100, 0), 30)
                if taken is not None:
                    break
            assert taken is not None
            relay.cut()
            leases.give_back(taken, Amount(100, 0), Amount(70, 0))
            assert await until(lambda: not store.up)
            assert leases.take([budget], Amount(100, 0), 30) is None, "the lease is forgotten"
            assert await until(lambda: not leases._leases), "its lease call fails too"
            spent[0] = Amount(70, 0)  # the ledger has the entry
            relay.restore()
            await store.reserve_many([Ask([budget], Amount(1, 0), "b", 30)])
            assert store.up
            counters = _counters(redis_prefix, budget)
            assert counters["sm"] == 70, "spending recounted from the ledger"
            assert _leases_held(redis_prefix, budget) == {}, "the unknown lease dropped"
        finally:
            await leases.close()
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        relay.cut()


def test_a_lowered_budget_takes_back_the_lease_granted_under_the_old_one(
    redis_prefix: str,
) -> None:
    before = BudgetCheck("tenant:acme", 0, 100_000, True)
    after = before._replace(limit_micros=1_000)

    async def scenario() -> None:
        replica = Replica(redis_prefix, requests=10)
        try:
            await replica.reserve([before], Amount(100, 0), "a")
            assert await until(lambda: bool(_leases_held(redis_prefix, before)))
            ok, leases = await replica.reserve([after], Amount(100, 0), "b")
            assert leases is None, "not from a lease granted under the old limit"
            assert not ok, "asked Redis while the old lease still held 1,000"
            assert await until(lambda: not _leases_held(redis_prefix, before)), "given back"
            admitted = 0
            for i in range(20):
                ok, _ = await replica.reserve([after], Amount(100, 0), f"c{i}")
                admitted += ok
            assert admitted == 9, "1,000 holds ten, and a holds one"
        finally:
            await replica.close()

    asyncio.run(scenario())


def test_workers_of_one_host_lease_from_the_state_database(tmp_path: Path) -> None:
    """`--workers`: the same leases, reserved in the shared SQLite state database; two workers
    spend a budget of 1,000 worst cases and exactly 1,000 are admitted."""
    budget = BudgetCheck("tenant:acme", 0, 100_000, True)
    worst = Amount(100, 0)
    path = tmp_path / "grifo.db"

    async def scenario() -> None:
        dbs = [StateDB(path), StateDB(path)]
        stores = [LocalReservations(db) for db in dbs]
        workers = [Leases(store, requests=16, share=4, flush_s=0) for store in stores]
        admitted = leased = refused_in_a_row = n = 0
        running: list[tuple[int, list[Lease] | None]] = []
        rng = random.Random(11)
        while refused_in_a_row < 50:
            n += 1
            w = rng.randrange(2)
            leases = workers[w].take([budget], worst, 30)
            if leases is None:
                [refused] = await stores[w].reserve_many([Ask([budget], worst, f"r{n}", 30)])
                ok = refused is None
            else:
                ok, leased = True, leased + 1
            if ok:
                admitted += 1
                refused_in_a_row = 0
                running.append((w, leases))
            else:
                refused_in_a_row += 1
                await asyncio.sleep(0.002)
            assert admitted <= 1000, "strict: never more than fits"
            if len(running) > 8 or (running and rng.random() < 0.3):
                done, done_leases = running.pop(rng.randrange(len(running)))
                if done_leases is not None:
                    workers[done].give_back(done_leases, worst, worst)
                else:
                    stores[done].settle_many([Settlement([budget], "x", worst, worst)])
            await asyncio.sleep(0)
        for done, done_leases in running:
            if done_leases is not None:
                workers[done].give_back(done_leases, worst, worst)
            else:
                stores[done].settle_many([Settlement([budget], "x", worst, worst)])
        for worker in workers:
            await worker.close()
        assert admitted == 1000
        assert leased > 500, "most came from leases"
        reserved, spent = dbs[0]._usage(budget)
        assert (reserved, spent) == (Amount(0, 0), Amount(100_000, 0)), "every lease given back"
        for db in dbs:
            db.close()

    asyncio.run(scenario())
