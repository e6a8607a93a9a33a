"""The ledger's write path: a batching writer thread behind the durable spool, and replay.

Entries are appended to the spool and queued from the event loop; one thread commits them in
batches (one transaction per batch), so the hot path never waits on the database, and deletes
spool segments once all their entries are committed. `close()` writes whatever is still queued.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from grifo.store.spool import Spool, read_segment, segments
from grifo.store.sqlite import LedgerEntry, connect


class _Segment(NamedTuple):
    """Marks, in the writer's queue, a spool segment whose entries are all ahead of it."""

    path: Path


class LedgerWriter:
    """Batches ledger entries into SQLite from a dedicated thread, behind a durable spool.

    `record` appends the entry to the spool (a crash after that loses nothing) and queues it;
    the thread commits batches and deletes spool segments whose entries are all committed.
    """

    def __init__(
        self,
        path: Path,
        spool_dir: Path,
        *,
        max_batch: int = 256,
        max_wait_s: float = 0.005,
    ) -> None:
        self._path = path
        self._spool = Spool(spool_dir)
        self._queue: queue.SimpleQueue[LedgerEntry | _Segment | None] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="grifo-ledger", daemon=True)
        self._thread.start()

    def record(self, entry: LedgerEntry) -> None:
        closed = self._spool.append(entry)
        self._queue.put(entry)
        if closed is not None:
            self._queue.put(_Segment(closed))

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(_Segment(self._spool.close()))
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        conn = connect(self._path)
        try:
            stop = False
            while not stop:
                batch, segment, stop = self._next_batch()
                if batch:
                    self._write(conn, batch)
                if segment is not None:
                    segment.unlink(missing_ok=True)  # every entry of it is committed
        finally:
            conn.close()

    def _next_batch(self) -> tuple[list[LedgerEntry], Path | None, bool]:
        """Block for one item, let more gather for `max_wait_s`, then take what is there, up
        to a segment marker or the stop signal.

        Sleeping once and draining without timeouts costs far less per entry than a timed
        `get()` for each.
        """
        batch: list[LedgerEntry] = []
        item = self._queue.get()
        if item is not None and not isinstance(item, _Segment):
            batch.append(item)
            time.sleep(self._max_wait_s)
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

    def _write(self, conn: sqlite3.Connection, batch: list[LedgerEntry]) -> None:
        write_entries(conn, batch)
        self.written += len(batch)


def write_entries(conn: sqlite3.Connection, entries: list[LedgerEntry]) -> None:
    """One transaction; an entry already present (same request id) is left as it is."""
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT OR IGNORE INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        entries,
    )
    conn.execute("COMMIT")


def replay_spool(db_path: Path, spool_dir: Path) -> int:
    """Commit what earlier processes spooled but did not commit; returns entries replayed."""
    conn = connect(db_path)
    replayed = 0
    try:
        for segment in segments(spool_dir):
            entries = list(read_segment(segment))
            if entries:
                write_entries(conn, entries)
            replayed += len(entries)
            segment.unlink()
    finally:
        conn.close()
    return replayed
