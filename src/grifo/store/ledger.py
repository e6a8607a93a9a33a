"""The write path of the ledger (and of the audit log): a batching writer thread behind the
durable spool, and replay.

Entries are appended to the spool and queued from the event loop; one thread commits them in
batches (one transaction per batch), so the hot path never waits on the database, and deletes
spool segments once all their entries are committed. When the database is down, requests go
on: the entries stay in their spool segments, which the thread replays once the database
answers again (every `retry_s`). `close()` writes whatever is still queued; what could not be
written stays in the spool for the next start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, NamedTuple, Protocol, TypeVar

from grifo.store import background as priority
from grifo.store.records import LedgerEntry
from grifo.store.spool import Spool, read_segment, segments

log = logging.getLogger("grifo.ledger")
R = TypeVar("R")
R_in = TypeVar("R_in")


class RecordSink(Protocol[R_in]):
    """A database connection that commits records; a record already present (same key) is
    left as it is, so replays are harmless."""

    def write_entries(self, entries: list[R_in]) -> None: ...

    def close(self) -> None: ...


LedgerSink = RecordSink[LedgerEntry]
Connect = Callable[[], LedgerSink]


class _Segment(NamedTuple):
    """Marks, in the writer's queue, a spool segment whose entries are all ahead of it."""

    path: Path


class RecordWriter(Generic[R]):
    """Batches records into the database from a dedicated thread, behind a durable spool.

    `record` appends the record to the spool (a crash after that loses nothing) and queues it;
    the thread commits batches and deletes spool segments whose records are all committed.
    `up` says whether the last write reached the database.

    After the first record of a batch the thread lets others gather for `max_wait_s`: a
    transaction's fixed cost is most of a small batch's, so records reach the database up to
    50 ms after their request (the spool holds them meanwhile) and the thread spends less than
    half the CPU per record it did with 5 ms (bench/README.md, "Ledger throughput").

    The thread runs in the background (`background.py`): a request never waits for the CPU
    behind a commit, unless the thread falls behind.
    """

    def __init__(
        self,
        connect: Callable[[], RecordSink[R]],
        spool_dir: Path,
        record_type: type[R],
        kind: str,
        *,
        max_batch: int = 2048,
        max_wait_s: float = 0.05,
        retry_s: float = 1.0,
        rotate_s: float = 2.0,
        backlog: Sequence[Path] = (),
        background: priority.Background | None = None,
    ) -> None:
        self._connect = connect
        self._background = priority.shared() if background is None else background
        self._late_s = 0.0  # how much longer than `max_wait_s` the last pause lasted
        self._type = record_type
        self._backlog = list(backlog)  # segments left by an earlier run: replayed first
        self._spool: Spool[R] = Spool(spool_dir, kind, rotate_s=rotate_s)
        self._queue: queue.SimpleQueue[R | _Segment | None] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._retry_s = retry_s
        self._sink: RecordSink[R] | None = None
        self._down_until = 0.0
        self.written = 0
        self.replayed = 0  # entries committed from spool segments rather than from the queue
        self.up = True
        self.pending_segments = 0
        self._worker = threading.Thread(target=self._run, name="grifo-ledger", daemon=True)
        self._worker.start()

    def record(self, entry: R) -> None:
        closed = self._spool.append(entry)
        self._queue.put(entry)
        if self._queue.qsize() > self._max_batch:
            self._background.behind()  # a backlog builds up: the thread must not starve
        if closed is not None:
            self._queue.put(_Segment(closed))

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(_Segment(self._spool.close()))
        self._queue.put(None)
        self._worker.join(timeout_s)

    def _run(self) -> None:
        dirty = False  # an entry since the last segment marker did not reach the database
        pending: list[Path] = self._backlog  # closed segments holding uncommitted entries
        self._background.start()
        try:
            pending = self._replay(pending)
            stop = False
            while not stop:
                self._spool.tidy()  # a rotation's file work, off the appending thread
                waiting = pending or dirty
                batch, segment, stop = self._next_batch(self._retry_s if waiting else None)
                if batch:
                    self._background.note(self._late_s, len(batch) >= self._max_batch)
                if batch and not self._commit(batch):
                    dirty = True
                if segment is not None:
                    if dirty:
                        pending.append(segment)
                        dirty = False
                    else:
                        segment.unlink(missing_ok=True)  # every entry of it is committed
                if dirty and not stop and time.monotonic() >= self._down_until:
                    # Time to try the database again, and the open segment holds entries it
                    # lacks: close it now rather than wait for the next request to rotate it.
                    closed = self._spool.rotate()
                    if closed is not None:  # else `close()` sends it as the last marker
                        pending.append(closed)
                        dirty = False
                if pending:
                    pending = self._replay(pending)
                self.pending_segments = len(pending)
        finally:
            self._background.stop()
            if self._sink is not None:
                self._sink.close()

    def _commit(self, entries: list[R]) -> bool:
        """Write `entries`; False (and the database is left alone for `retry_s`) on failure."""
        if time.monotonic() < self._down_until:
            return False
        try:
            if self._sink is None:
                self._sink = self._connect()
            self._sink.write_entries(entries)
        except Exception as exc:  # any database or network error: the spool keeps the entries
            if self.up:
                log.warning(
                    "database unavailable for %s entries (%s); they wait in the spool",
                    self._spool.kind,
                    type(exc).__name__,
                )
            self.up = False
            self._down_until = time.monotonic() + self._retry_s
            if self._sink is not None:
                sink, self._sink = self._sink, None
                try:
                    sink.close()
                except Exception:  # already broken
                    log.debug("closing a broken ledger connection failed", exc_info=True)
            return False
        if not self.up:
            log.warning("database is back for %s entries", self._spool.kind)
        self.up = True
        self.written += len(entries)
        return True

    def _replay(self, pending: list[Path]) -> list[Path]:
        """Commit the segments' entries (oldest first); returns those still pending."""
        for index, path in enumerate(pending):
            entries = list(read_segment(path, self._type))
            for start in range(0, len(entries), self._max_batch * 8):
                if not self._commit(entries[start : start + self._max_batch * 8]):
                    return pending[index:]
            path.unlink(missing_ok=True)
            self.replayed += len(entries)
        return []

    def _next_batch(self, timeout_s: float | None) -> tuple[list[R], Path | None, bool]:
        """Block for one item (at most `timeout_s`), let more gather for `max_wait_s`, then
        take what is there, up to a segment marker or the stop signal.

        Sleeping once and draining without timeouts costs far less per entry than a timed
        `get()` for each.
        """
        batch: list[R] = []
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return batch, None, False
        if item is not None and not isinstance(item, _Segment):
            batch.append(item)
            paused = time.monotonic()
            time.sleep(self._max_wait_s)
            self._late_s = time.monotonic() - paused - self._max_wait_s
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return batch, None, False
                if item is None or isinstance(item, _Segment):
                    break
                batch.append(item)
            else:
                return batch, None, False
        if item is None:
            return batch, None, True
        return batch, item.path, False


class LedgerWriter(RecordWriter[LedgerEntry]):
    """The ledger's writer: spool segments `ledger-*.jsonl`."""

    def __init__(
        self,
        connect: Connect,
        spool_dir: Path,
        *,
        retry_s: float = 1.0,
        rotate_s: float = 2.0,
        backlog: Sequence[Path] = (),
    ) -> None:
        super().__init__(
            connect,
            spool_dir,
            LedgerEntry,
            "ledger",
            retry_s=retry_s,
            rotate_s=rotate_s,
            backlog=backlog,
        )


def replay_spool(connect: Connect, spool_dir: Path) -> int:
    """Commit what earlier processes spooled but did not commit; returns entries replayed."""
    sink = connect()
    replayed = 0
    try:
        for segment in segments(spool_dir):
            entries = list(read_segment(segment, LedgerEntry))
            if entries:
                sink.write_entries(entries)
            replayed += len(entries)
            segment.unlink()
    finally:
        sink.close()
    return replayed
