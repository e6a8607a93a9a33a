"""The ledger survives kill -9: spooled before the response, replayed exactly once at start."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from grifo.store import sqlite as store
from grifo.store.ledger import LedgerWriter, replay_spool
from grifo.store.records import LedgerEntry
from grifo.store.spool import segments
from grifo.store.sqlite import StateDB
from tests.support.fabric import CHAT, topology_yaml
from tests.support.processes import serve


def entry(i: int) -> LedgerEntry:
    return LedgerEntry(
        f"req-{i}", 1, "t", "k", "/v1/chat/completions", "m", "p", "PE", 3, 4, 5, "ok", "point", 1.0
    )


def test_writer_commits_and_empties_the_spool(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "grifo.db")
    writer = LedgerWriter(db.open_ledger, tmp_path / "spool")
    for i in range(500):
        writer.record(entry(i))
    writer.close()
    assert [e.request_id for e in db.ledger()] == sorted(f"req-{i}" for i in range(500))
    assert segments(tmp_path / "spool") == []
    db.close()


class FlakyLedger:
    """A real SQLite ledger connection behind a switch that makes the database unreachable."""

    down = threading.Event()

    def __init__(self, db: StateDB) -> None:
        if self.down.is_set():
            raise ConnectionError("database unreachable")
        self._inner = db.open_ledger()

    def write_entries(self, entries: list[LedgerEntry]) -> None:
        if self.down.is_set():
            raise ConnectionError("database unreachable")
        self._inner.write_entries(entries)

    def close(self) -> None:
        self._inner.close()


def test_entries_wait_in_the_spool_while_the_database_is_down(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "grifo.db")
    FlakyLedger.down.clear()
    writer = LedgerWriter(lambda: FlakyLedger(db), tmp_path / "spool", retry_s=0.05, rotate_s=0.05)
    for i in range(100):
        writer.record(entry(i))
    _wait(lambda: writer.written == 100)
    FlakyLedger.down.set()
    for i in range(100, 300):
        writer.record(entry(i))
        if i % 50 == 0:
            time.sleep(0.02)
    _wait(lambda: not writer.up)
    assert len(db.ledger()) < 300
    assert segments(tmp_path / "spool"), "the entries must be kept on disk meanwhile"
    FlakyLedger.down.clear()
    time.sleep(0.1)
    writer.record(entry(300))  # rotates the spool segment, which then replays
    _wait(lambda: len(db.ledger()) == 301)
    assert writer.up
    writer.close()
    assert [e.request_id for e in db.ledger()] == sorted(f"req-{i}" for i in range(301))
    assert segments(tmp_path / "spool") == []
    db.close()


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_replay_is_idempotent_and_skips_a_torn_line(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "grifo.db")
    spool = tmp_path / "spool"
    spool.mkdir()
    lines = [json.dumps(list(entry(i))) for i in range(3)]
    (spool / "ledger-1-1-0.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:20])
    (spool / "ledger-1-1-1.jsonl").write_text(lines[1] + "\n")  # a duplicate of a replayed one
    assert replay_spool(db.open_ledger, spool) == 4
    assert [e.request_id for e in db.ledger()] == ["req-0", "req-1", "req-2"]
    assert segments(spool) == []
    db.close()


def test_kill_9_under_load_loses_no_served_request(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    state = tmp_path / "state"
    proc, port = serve(config, state)
    key = json.loads((state / "demo-keys.json").read_text())["demo-global"]
    body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "bill me"}]})
    served: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(
                    "POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"}
                )
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    served.append(response.headers["x-request-id"])
            except OSError:
                return  # the gateway is gone
            finally:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(served) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-load, with entries in flight to SQLite
    stop.set()
    for t in threads:
        t.join(10)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
    assert len(served) >= 300

    again, _ = serve(config, state)  # replays the spool at start
    again.send_signal(signal.SIGTERM)
    assert again.wait(30) == 0
    if again.stdout is not None:
        again.stdout.close()
    db = StateDB(state / "grifo.db")
    try:
        rows = db.ledger()
    finally:
        db.close()
    ids = [e.request_id for e in rows]
    assert len(ids) == len(set(ids))
    missing = set(served) - set(ids)
    assert not missing, f"{len(missing)} answered requests have no ledger entry"
    assert segments(state / "spool") == []


def test_schema_migrations_upgrade_an_older_database(tmp_path: Path) -> None:
    import sqlite3

    from grifo.store import sqlite as store

    path = tmp_path / "grifo.db"
    old = sqlite3.connect(path)
    old.executescript(store._MIGRATIONS[0])  # a database from before token budgets
    old.execute("INSERT INTO budget_usage VALUES ('tenant:t', 0, 5, 7)")
    old.commit()
    old.close()
    db = StateDB(path)  # opening migrates
    db.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store._MIGRATIONS)
        row = conn.execute("SELECT * FROM budget_usage").fetchone()
    finally:
        conn.close()
    assert row == ("tenant:t", 0, 5, 7, 0, 0)
    StateDB(path).close()  # a second open is a no-op


def test_a_current_database_opens_while_another_process_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    """A worker of `serve --workers` starting while the others commit ledger batches."""
    path = tmp_path / "grifo.db"
    StateDB(path).close()  # created and migrated
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        conn = store.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store._MIGRATIONS)
        conn.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
