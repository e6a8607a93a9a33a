"""The PostgreSQL state store against the real server: keys, idempotency, ledger, outages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from grifo.errors import StoreUnavailableError
from grifo.store.ledger import LedgerWriter
from grifo.store.postgres import _MIGRATIONS, PostgresDB
from grifo.store.records import Amount, LedgerEntry, StoredKey
from grifo.store.spool import segments
from tests.support.fabric import CHAT, Fabric, topology_yaml
from tests.support.stores import POSTGRES_URL, TcpRelay


def entry(i: int, tenant: str = "t", cost: int = 5) -> LedgerEntry:
    return LedgerEntry(
        f"req-{i:05d}", 1000 + i, tenant, "k", "/v1/chat/completions", "m", "p", "PE", 3, 4,
        cost, "ok", "point", 1.0,
    )  # fmt: skip


def _wait(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_replicas_migrate_once_and_share_keys(pg_schema: str) -> None:
    dbs: list[PostgresDB] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            dbs.append(PostgresDB(POSTGRES_URL, pg_schema))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a, b = dbs[0], dbs[1]
    try:
        a.add_key(StoredKey("k1", "acme", "ab" * 32))
        a.add_key(StoredKey("k2", "acme", "cd" * 32, "auditor", 1_900_000_000_000, "m1,m2"))
        assert b.active_keys() == [
            StoredKey("k1", "acme", "ab" * 32),
            StoredKey("k2", "acme", "cd" * 32, "auditor", 1_900_000_000_000, "m1,m2"),
        ]
        assert b.revoke_key("k1")
        assert not b.revoke_key("k1"), "already revoked"
        assert [k for k, *_ in a.active_keys()] == ["k2"]
        with psycopg.connect(POSTGRES_URL) as conn:
            version = conn.execute(f"SELECT version FROM {pg_schema}.grifo_schema").fetchall()
        assert version == [(len(_MIGRATIONS),)], "one row, written once"
    finally:
        for db in dbs:
            db.close()


def test_idempotency_keys_are_shared_between_replicas(pg_schema: str) -> None:
    a, b = PostgresDB(POSTGRES_URL, pg_schema), PostgresDB(POSTGRES_URL, pg_schema)
    try:
        assert a.claim_key("acme", "retry-1", "fp", "req-a", stale_ms=60_000) is None
        held = b.claim_key("acme", "retry-1", "fp", "req-b", stale_ms=60_000)
        assert held is not None
        assert (held.request_id, held.status) == ("req-a", None)
        a.settle_key("acme", "retry-1", 200, '{"x-request-id": "req-a"}', b"{}", False)
        done = b.claim_key("acme", "retry-1", "fp", "req-c", stale_ms=60_000)
        assert done is not None
        assert (done.status, done.body, done.stream) == (200, b"{}", 0)
        assert b.claim_key("other", "retry-1", "fp", "req-d", stale_ms=60_000) is None
        assert a.claim_key("acme", "stale", "fp", "req-e", stale_ms=60_000) is None
        time.sleep(0.01)
        assert b.claim_key("acme", "stale", "fp", "req-f", stale_ms=1) is None, "taken over"
        b.release_key("acme", "stale", "req-f")
        assert a.claim_key("acme", "stale", "fp", "req-g", stale_ms=60_000) is None
    finally:
        a.close()
        b.close()


def test_ledger_writes_are_idempotent_and_totals_add_up(pg_schema: str, tmp_path: Path) -> None:
    db = PostgresDB(POSTGRES_URL, pg_schema)
    writer = LedgerWriter(db.open_ledger, tmp_path / "spool")
    try:
        for i in range(1000):
            writer.record(entry(i, tenant="a" if i % 4 else "b", cost=i))
        for i in range(10):
            writer.record(entry(i, cost=10**9))  # a replayed duplicate changes nothing
        writer.close()
        rows = db.ledger()
        assert len(rows) == 1000
        totals = {g: (n, cost) for g, n, _, _, cost in db.totals("tenant")}
        assert totals == {
            "a": (750, sum(i for i in range(1000) if i % 4)),
            "b": (250, sum(i for i in range(1000) if not i % 4)),
        }
        assert db.spent("tenant:b", 0) == Amount(totals["b"][1], 250 * 7)
        assert db.spent("tenant:b", 1000 + 500) == Amount(sum(range(500, 1000, 4)), 125 * 7)
        assert segments(tmp_path / "spool") == []
    finally:
        db.close()


def test_entries_spool_while_postgres_is_down_and_replay(pg_schema: str, tmp_path: Path) -> None:
    relay = TcpRelay("127.0.0.1", 5432)
    url = relay.url(POSTGRES_URL)
    db = PostgresDB(url, pg_schema, retry_s=0.1)
    writer = LedgerWriter(db.open_ledger, tmp_path / "spool", retry_s=0.1, rotate_s=0.1)
    direct = PostgresDB(POSTGRES_URL, pg_schema)
    try:
        for i in range(50):
            writer.record(entry(i))
        _wait(lambda: writer.written == 50)
        relay.cut()
        for i in range(50, 250):
            writer.record(entry(i))
            time.sleep(0.001)
        _wait(lambda: not writer.up)
        with pytest.raises(StoreUnavailableError):
            db.active_keys()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            db.active_keys()
        assert time.monotonic() - started < 0.05, "while down, calls fail fast"
        assert len(direct.ledger()) < 250
        relay.restore()
        time.sleep(0.2)
        writer.record(entry(250))
        _wait(lambda: len(direct.ledger()) == 251)
        assert writer.up
        assert db.active_keys() == []
        writer.close()
        assert [e.request_id for e in direct.ledger()] == [f"req-{i:05d}" for i in range(251)]
        assert segments(tmp_path / "spool") == []
    finally:
        relay.cut()
        direct.close()
        db.close()


def test_an_unreachable_database_is_a_clear_error(pg_schema: str) -> None:
    relay = TcpRelay("127.0.0.1", 5432)
    relay.cut()
    with pytest.raises(StoreUnavailableError, match=r"cannot reach the PostgreSQL database"):
        PostgresDB(relay.url(POSTGRES_URL), pg_schema)


def test_requests_go_on_while_postgres_is_down(pg_schema: str, tmp_path: Path) -> None:
    relay = TcpRelay("127.0.0.1", 5432)
    store = f'store: {{postgres_url: "{relay.url(POSTGRES_URL)}", postgres_schema: {pg_schema}}}'
    text = topology_yaml().replace("health_interval_s: 0.2}", f"health_interval_s: 0.2, {store}}}")
    fabric = Fabric.from_yaml(text, tmp_path / "state")
    direct = PostgresDB(POSTGRES_URL, pg_schema)
    try:
        client = fabric.client("demo-global")
        messages: list[Any] = [{"role": "user", "content": "hello"}]
        first = client.chat.completions.with_raw_response.create(model=CHAT, messages=messages)
        relay.cut()
        served = [
            client.chat.completions.with_raw_response.create(model=CHAT, messages=messages)
            for _ in range(20)
        ]
        assert all(r.status_code == 200 for r in served), "requests go on without the database"
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model=CHAT, messages=messages, extra_headers={"idempotency-key": "k1"}
            )
        assert refused.value.status_code == 503
        assert refused.value.code == "store_unavailable"
        _wait(lambda: _stores_up(fabric) == (0, 0))  # the outage shows in /metrics
        _wait(lambda: _backlogs(fabric)[1] >= 1)  # audit records wait in the spool
        relay.restore()
        ids = {r.headers["x-request-id"] for r in [first, *served]}
        _wait(lambda: {e.request_id for e in direct.ledger()} == ids)
        _wait(lambda: _stores_up(fabric) == (1, 1) and _backlogs(fabric) == (0, 0))
        appended = fabric.metrics()["grifo_audit_records_total"]
        assert appended == 22  # 21 served, 1 refused
        tables = direct.open_audit()
        try:
            stored = [row for log in tables.logs() for row in tables.records_from(log, 0)]
        finally:
            tables.close()
        assert len(stored) == appended
    finally:
        fabric.close()
        relay.cut()
        direct.close()


def _stores_up(fabric: Fabric) -> tuple[float, float]:
    """`grifo_store_up` of the ledger and of the audit log."""
    metrics = fabric.metrics()
    return metrics['grifo_store_up{store="ledger"}'], metrics['grifo_store_up{store="audit"}']


def _backlogs(fabric: Fabric) -> tuple[float, float]:
    """Spool segments waiting for the database: the ledger's and the audit log's."""
    metrics = fabric.metrics()
    return (
        metrics["grifo_ledger_spool_backlog_segments"],
        metrics["grifo_audit_spool_backlog_segments"],
    )
