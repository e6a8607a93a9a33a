"""Writers of one SQLite file in many processes take turns instead of failing as locked."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from grifo.audit.record import AuditRow
from grifo.store import sqlite
from grifo.store.host_lock import HostLock
from grifo.store.records import LedgerEntry

PROCESSES, ROUNDS, ROWS = 6, 60, 20


def _write(path: str, worker: int, ready: multiprocessing.synchronize.Barrier) -> None:
    """One worker's ledger, audit and state connections writing as hard as they can; SQLite's
    own wait for its lock is cut to a few tries (20 ms), so only taking turns keeps it from
    failing."""
    sqlite.BUSY_TIMEOUT_MS = 20
    db = sqlite.StateDB(Path(path))
    ledger, audit = db.open_ledger(), db.open_audit()
    ready.wait()
    for n in range(ROUNDS):
        ledger.write_entries([
            LedgerEntry(f"w{worker}-{n}-{i}", n, "t", "k", "/v1/chat/completions", "m", "p",
                        "PE", 3, 4, 5, "ok", "point", 1.0)
            for i in range(ROWS)
        ])  # fmt: skip
        audit.write_records([
            AuditRow(f"gw/{worker}", n * ROWS + i, f"w{worker}-{n}-{i}", "t", n, "{}", "h", "l")
            for i in range(ROWS)
        ])  # fmt: skip
        db.put_tenant(f"w{worker}-{n}", "{}")
    ledger.close()
    audit.close()
    db.close()


def test_many_processes_write_one_database_without_a_locked_error(tmp_path: Path) -> None:
    path = tmp_path / "grifo.db"
    sqlite.StateDB(path).close()  # created and migrated once, as `grifo serve` does
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(PROCESSES)
    workers = [
        spawn.Process(target=_write, args=(str(path), worker, ready)) for worker in range(PROCESSES)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [p.exitcode for p in workers] == [0] * PROCESSES
    db = sqlite.StateDB(path)
    assert len(db.ledger()) == PROCESSES * ROUNDS * ROWS
    assert len(db.stored_tenants()) == PROCESSES * ROUNDS
    db.close()


def test_the_lock_file_is_held_by_one_connection_at_a_time(tmp_path: Path) -> None:
    first, second = HostLock(tmp_path / "grifo.db"), HostLock(tmp_path / "grifo.db")
    order: list[str] = []
    with first:
        waiter = threading.Thread(target=lambda: (second.__enter__(), order.append("second")))
        waiter.start()
        waiter.join(0.2)
        order.append("first done")
    waiter.join(10)
    second.__exit__(None, None, None)
    assert order == ["first done", "second"]
    assert first.path == second.path == tmp_path / "grifo.db-lock"
    assert os.stat(first.path).st_mode & 0o777 == 0o600
    first.close()
    second.close()


def test_reads_do_not_wait_for_another_connections_write_turn(tmp_path: Path) -> None:
    db = sqlite.StateDB(tmp_path / "grifo.db")
    db.put_tenant("acme", "{}")
    writer = HostLock(tmp_path / "grifo.db")  # another connection holding its turn
    answers: list[object] = []

    def read() -> None:
        answers.extend([db.stored_tenants(), db.active_keys(), db.totals("tenant"), db.ledger()])

    with writer:
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive()
    assert answers == [[("acme", "{}")], [], [], []]
    writer.close()
    db.close()


def test_a_transaction_that_raises_writes_nothing_and_lets_the_next_one_in(tmp_path: Path) -> None:
    path = tmp_path / "grifo.db"
    sqlite.StateDB(path).close()
    conn, lock = sqlite.connect(path), HostLock(path)

    def half_done() -> None:
        with lock.transaction(conn):
            conn.execute("INSERT INTO tenants VALUES ('half', '{}', 1)")
            raise ValueError("midway")

    with pytest.raises(ValueError, match="midway"):
        half_done()
    with lock.transaction(conn):
        conn.execute("INSERT INTO tenants VALUES ('whole', '{}', 2)")
    assert conn.execute("SELECT name FROM tenants").fetchall() == [("whole",)]
    conn.close()
    lock.close()
