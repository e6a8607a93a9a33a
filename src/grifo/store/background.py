"""A writer thread's CPU priority: in the background while it keeps up, normal when it falls
behind.

The ledger's and the audit log's writer threads commit a batch every 50 ms, each a burst of
SQLite work of up to a millisecond. On a gateway with one CPU (a container's share, a pinned
process) a request that arrives during a burst waits for the CPU: Linux lets the running thread
finish its time slice before the woken event loop runs. That was most of the c=1 p99 (1.1 ms
against 0.5 ms with the writers in the background; bench/README.md, "A lone request").

So a writer runs under `SCHED_IDLE`: any other thread of the host that wants the CPU takes it
at once, and the writer gets what is left. When nothing is left (a saturated core, an engine's
threads spinning beside the gateway), it would starve and its queue would grow: the thread that
queues records puts it back to normal priority once more than a quarter of a batch waits, and
so does the writer when its 50 ms pause lasted far longer or its batch came back full; it tries
the background again once 10 s have passed without a backlog (a loaded gateway keeps its
writers at normal priority: going in and out of the background every second under load let
their queues swing, and RSS rose by up to 30 MiB).

Linux lets a thread leave `SCHED_IDLE` only with `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 (most
containers have neither). Where it could not come back, a writer never enters it: it stays at
normal priority, as without this module.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable

log = logging.getLogger("grifo.ledger")

_CAP_SYS_NICE = 23


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
    """A writer thread's priority: `start()` once from that thread, `note()` from it after each
    pause between batches; `behind()` from any thread."""

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
        self._thread_id = 0
        self.idle = False

    def start(self) -> None:
        self._thread_id = threading.get_native_id()
        if self._allowed:
            self.idle = self._set(self._thread_id, True)

    def behind(self) -> None:
        """The writer is falling behind: normal priority, for `hold_s` at least from now."""
        self._normal_until = self._clock() + self._hold_s
        if self.idle and self._set(self._thread_id, False):
            self.idle = False
            log.debug("writer thread behind: back to normal priority")

    def note(self, late_s: float, full: bool) -> None:
        """A pause between batches ended `late_s` later than asked; `full`: the batch taken
        after it was as large as a batch may be (more is waiting)."""
        if not self._allowed:
            return
        if late_s > self._late_s or full:
            self.behind()
        elif not self.idle and self._clock() >= self._normal_until:
            self.idle = self._set(self._thread_id, True)
