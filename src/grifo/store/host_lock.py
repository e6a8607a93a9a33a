"""Writers of one SQLite database take turns through a lock file beside it.

SQLite lets one writer in at a time; the others poll for the lock, sleeping longer and longer
between tries (up to 100 ms). With many writers at once (`grifo serve --workers 8`, each worker
with its ledger, audit and state connections), a writer can lose every try for the whole busy
timeout and fail with "database is locked" (bench/README.md, "Workers across cores"). Waiting on
`flock` instead, a writer is woken as soon as the lock is let go, so every writer gets its turn;
SQLite's own lock is then rarely contended. The kernel drops the lock of a process that dies.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType


class HostLock:
    """One connection's turn at writing `database` (a threading lock for the connection's own
    threads, then the lock file `<database>-lock` for every other connection on this host).
    A read takes `thread` only: WAL readers never wait for writers, and a long report must not
    hold up every worker's writes."""

    def __init__(self, database: Path) -> None:
        self.path = Path(f"{database}-lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.thread = threading.Lock()

    def __enter__(self) -> None:
        self.thread.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self.thread.release()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self.thread.release()

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """This connection's turn, then one transaction on `conn` (holding SQLite's write lock
        from its start): committed when the block ends, rolled back if it raises."""
        with self:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # not after a COMMIT that ended it as it failed
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self.thread:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
