"""Writer threads run in the background (`SCHED_IDLE`) while they keep up, and go back to
normal priority when they fall behind (store/background.py). The policy is read back from the
kernel for the real thread; the decisions alone are tested with a fake setter and clock."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from grifo.store import background
from grifo.store.background import Background, may_leave_idle
from grifo.store.host_lock import HostLock
from grifo.store.ledger import RecordWriter
from grifo.store.records import LedgerEntry
from grifo.store.sqlite import SqliteLedger
from tests.support.clock import Clock


def entry(n: int) -> LedgerEntry:
    return LedgerEntry(
        f"req-{n}", 0, "t", "k", "/v1/chat/completions", "m", "p", "PE", 1, 1, 1, "ok", "point", 0.1
    )


class BlockedSink:
    """Commits nothing until let go: the writer's queue builds up behind it."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.written: list[LedgerEntry] = []

    def write_entries(self, entries: list[LedgerEntry]) -> None:
        self.go.wait(10)
        self.written += entries

    def close(self) -> None:
        pass


def policy(writer: RecordWriter[LedgerEntry]) -> int:
    thread_id = writer._worker.native_id
    assert thread_id is not None
    return os.sched_getscheduler(thread_id)


def wait_for(check: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_a_writer_that_keeps_up_runs_in_the_background_and_a_backlog_brings_it_back(
    tmp_path: Path,
) -> None:
    sink = BlockedSink()
    writer = RecordWriter(
        lambda: sink, tmp_path, LedgerEntry, "ledger", max_batch=8, background=Background()
    )
    try:
        allowed = may_leave_idle()
        expected = os.SCHED_IDLE if allowed else os.SCHED_OTHER
        wait_for(lambda: policy(writer) == expected)
        writer.record(entry(0))  # the writer takes it and blocks in the sink
        wait_for(lambda: writer._queue.qsize() == 0)
        for n in range(1, 10):  # 9 waiting, more than a batch (8):
            writer.record(entry(n))
        # the thread that queued them put the writer back to normal priority
        assert policy(writer) == os.SCHED_OTHER
        assert not writer._background.idle
        sink.go.set()
        wait_for(lambda: len(sink.written) == 10)
    finally:
        sink.go.set()
        writer.close()
    assert [e.request_id for e in sink.written] == [f"req-{n}" for n in range(10)]


def test_where_a_thread_could_not_come_back_it_never_leaves_normal_priority(
    tmp_path: Path,
) -> None:
    sink = BlockedSink()
    sink.go.set()
    writer = RecordWriter(
        lambda: sink, tmp_path, LedgerEntry, "ledger", background=Background(allowed=False)
    )
    try:
        writer.record(entry(0))
        wait_for(lambda: len(sink.written) == 1)
        assert policy(writer) == os.SCHED_OTHER
    finally:
        writer.close()


def test_priority_decisions() -> None:
    calls: list[tuple[int, bool]] = []

    def setter(thread_id: int, idle: bool) -> bool:
        calls.append((thread_id, idle))
        return True

    clock = Clock()
    background = Background(True, setter=setter, late_s=0.1, hold_s=1.0, clock=clock)
    background.start()
    me = threading.get_native_id()
    assert calls == [(me, True)]
    assert background.idle
    background.note(0.001, full=False)  # punctual and not full: stays in the background
    assert calls == [(me, True)]
    background.note(0.5, full=False)  # its pause lasted far longer: it was starved
    assert calls[-1] == (me, False)
    assert not background.idle
    clock.now += 0.5
    background.note(0.0, full=False)  # normal for a second at least
    assert calls[-1] == (me, False)
    clock.now += 0.6
    background.note(0.0, full=False)
    assert calls[-1] == (me, True)
    assert background.idle
    background.note(0.0, full=True)  # a full batch: more was waiting
    assert calls[-1] == (me, False)
    background.behind()  # already normal: nothing to change
    assert len(calls) == 4


def test_the_writers_of_a_process_change_priority_together() -> None:
    """One writer falling behind brings all back: one left in the background could be starved
    holding the database's lock that the others wait for."""
    calls: list[tuple[int, bool]] = []
    refuse: set[int] = set()

    def setter(thread_id: int, idle: bool) -> bool:
        calls.append((thread_id, idle))
        return not (idle and thread_id in refuse)

    clock = Clock()
    background = Background(True, setter=setter, hold_s=1.0, clock=clock)
    ids: list[int] = []

    def writer() -> None:
        background.start()
        ids.append(threading.get_native_id())

    for _ in range(2):
        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
    first, second = ids
    assert background.idle
    assert calls == [(first, True), (second, True)]  # the second joined the background
    calls.clear()
    background.behind()
    assert sorted(calls) == sorted([(first, False), (second, False)])
    calls.clear()
    clock.now += 2
    refuse.add(second)  # one cannot go: none stays in the background
    background.note(0.0, full=False)
    assert not background.idle
    assert calls[-1] == (first, False)
    background.stop()  # this thread was never a writer: nothing to forget
    assert len(background._threads) == 2


def test_a_refusal_leaves_the_thread_where_it_was() -> None:
    background = Background(True, setter=lambda thread_id, idle: False)
    background.start()
    assert not background.idle
    background.note(0.0, full=False)
    assert not background.idle


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_may_leave_idle_agrees_with_the_kernel() -> None:
    """A thread put in the background comes back exactly when `may_leave_idle` says so."""
    result: list[bool] = []

    def probe() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            result.append(True)
        except PermissionError:
            result.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert result == [may_leave_idle()]


def test_a_batch_goes_in_pieces_within_the_callers_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row of a batch of several pieces is written (whole pieces as one statement, the
    rest a row at a time), the CPU is yielded between pieces, and a piece that fails takes the
    pieces before it back with it (one transaction)."""
    yields: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    db = SqliteLedger(tmp_path / "grifo.db")
    rows = [entry(n) for n in range(3 * background.PIECE_ROWS + 5)]
    db.write_entries(rows)
    assert len(yields) == 3
    conn = sqlite3.connect(tmp_path / "grifo.db")
    assert conn.execute("SELECT * FROM ledger ORDER BY rowid").fetchall() == rows
    more = [entry(n) for n in range(len(rows) - 3, len(rows) + background.PIECE_ROWS)]
    db.write_entries(more)  # a whole piece, 3 rows of it already there: those are left alone
    count = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    assert count == len(rows) + background.PIECE_ROWS
    conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    twice = [(n,) for n in range(2 * background.PIECE_ROWS)] + [(0,)]  # the last piece fails
    lock = HostLock(tmp_path / "grifo.db")
    with pytest.raises(sqlite3.IntegrityError), lock.transaction(conn):
        background.insert(conn, "INSERT INTO t", twice)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    db.close()
    lock.close()
    conn.close()
