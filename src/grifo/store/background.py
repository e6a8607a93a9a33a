"""A writer thread's CPU priority: in the background while it keeps up, normal when it falls
behind.

The ledger's and the audit log's writer threads commit a batch every 50 ms, each a burst of
SQLite work of up to a millisecond. On a gateway with one CPU (a container's share, a pinned
process) a request that arrives during a burst waits for the CPU: Linux lets the running thread
finish its time slice before the woken event loop runs. That was most of the c=1 p99 (1.1 ms
against 0.4 ms with the writers in the background; bench/README.md, "A lone request").

So a writer runs under `SCHED_IDLE`: any other thread of the host that wants the CPU takes it
at once, and the writer gets what is left. When nothing is left (a saturated core, an engine's
threads spinning beside the gateway), it would starve and its queue would grow: the thread that
queues records puts it back to normal priority once more than a batch (2,048 records) waits,
and so does the writer when its 50 ms pause lasted far longer or its batch came back full; it
tries the background again once 10 s have passed without a backlog (a loaded gateway keeps its
writers at normal priority: going in and out of the background every second under load let
their queues swing, and RSS rose by up to 30 MiB). A quarter of a batch was too little: at c=1
a writer in the background takes longer over its commits, and crossed it.

A batch is inserted in pieces of `PIECE_ROWS`, and the writer yields the CPU between them
(`insert`): at normal priority, a saturated event loop then waits for a piece (~0.1 ms), not
for a whole batch of 800 rows or more (a few ms, up to the scheduler's time slice), which had
been most of the p99 at c=64 (bench/README.md, "Writer threads at c=64"). In the background
the yields cost nothing: no other thread is waiting.

Linux lets a thread leave `SCHED_IDLE` only with `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 (most
containers have neither). Where it could not come back, a writer never enters it: it stays at
normal priority, as without this module.
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("grifo.ledger")

_CAP_SYS_NICE = 23
PIECE_ROWS = 64


def insert(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """`head` (`INSERT ... INTO table`) for every row, in pieces of `PIECE_ROWS` rows, yielding
    the CPU to any other thread that wants it between pieces (in one transaction: the caller's).
    A whole piece is one statement of many rows: a third less CPU a row than a statement for
    each (bench/README.md, "Writer threads at c=64")."""
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    piece_sql = f"{head} VALUES {', '.join([one] * PIECE_ROWS)}"
    for start in range(0, len(rows), PIECE_ROWS):
        if start:
            os.sched_yield()
        piece = rows[start : start + PIECE_ROWS]
        if len(piece) == PIECE_ROWS:
            conn.execute(piece_sql, list(itertools.chain.from_iterable(piece)))
        else:
            conn.executemany(f"{head} VALUES {one}", piece)


def may_leave_idle() -> bool:
    """Whether this process's threads may go back from `SCHED_IDLE` to normal priority."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20:  # the ceiling is 20 - limit
            return True
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def set_idle(thread_id: int, idle: bool) -> bool:
    """Put a thread of this process (its native id) in the background (`SCHED_IDLE`) or back
    to normal; False if the system refused."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    try:
        os.sched_setscheduler(thread_id, policy, os.sched_param(0))
    except OSError as exc:
        log.debug("writer thread priority unchanged: %s", exc)
        return False
    return True


class Background:
    """The priority of a process's writer threads, together: `start()` from each thread as it
    begins and `stop()` as it ends, `note()` from it after each pause between batches;
    `behind()` from any thread.

    The writers of one process take turns at its database (`host_lock.py`): one left in the
    background while another is at normal priority could be starved holding the lock, and the
    other would wait behind it (the audit log's checkpoint writer, with a record every 1,000
    requests, did that to the busy ledger and audit writers: both stalled for half a second).
    So they all go back to normal priority when one falls behind, and into the background
    together."""

    def __init__(
        self,
        allowed: bool | None = None,
        *,
        setter: Callable[[int, bool], bool] = set_idle,
        late_s: float = 0.1,
        hold_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allowed = may_leave_idle() if allowed is None else allowed
        self._set = setter
        self._late_s = late_s  # a pause this much longer than asked: the thread was starved
        self._hold_s = hold_s  # then normal priority for this long at least
        self._clock = clock
        self._normal_until = 0.0
        self._threads: set[int] = set()
        self.idle = False  # the writers are in the background

    def start(self) -> None:
        thread_id = threading.get_native_id()
        self._threads.add(thread_id)
        if not self._allowed:
            return
        if self.idle:
            self._set(thread_id, True)
        elif self._clock() >= self._normal_until:
            self._all(True)

    def stop(self) -> None:
        self._threads.discard(threading.get_native_id())

    def behind(self) -> None:
        """A writer is falling behind: all at normal priority, for `hold_s` at least from now."""
        self._normal_until = self._clock() + self._hold_s
        if self.idle:
            self._all(False)
            log.debug("a writer thread fell behind: writers back to normal priority")

    def note(self, late_s: float, full: bool) -> None:
        """A pause between batches ended `late_s` later than asked; `full`: the batch taken
        after it was as large as a batch may be (more is waiting)."""
        if not self._allowed:
            return
        if late_s > self._late_s or full:
            self.behind()
        elif not self.idle and self._clock() >= self._normal_until:
            self._all(True)

    def _all(self, idle: bool) -> None:
        """Every writer into the background, or back; where one refuses, all stay normal."""
        threads = list(self._threads)
        done = [t for t in threads if self._set(t, idle)]
        if idle and len(done) < len(threads):
            for thread_id in done:
                self._set(thread_id, False)
            idle = False
        self.idle = idle


_shared: Background | None = None


def shared() -> Background:
    """This process's writers' `Background`."""
    global _shared
    if _shared is None:
        _shared = Background()
    return _shared
