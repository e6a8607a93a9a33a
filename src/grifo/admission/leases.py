"""Budget leases: a slice of a shared budget that this process reserves once and spends locally.

With replicas sharing budgets in Redis, asking Redis for every request's reservation costs the
gateway more than the rest of admission together (and with `--workers`, a transaction in the
shared SQLite state database for each event-loop turn contends for its lock). A lease is one
reservation, in Redis (or the state database: "Redis" below stands for either), of room
for about `requests` worst cases; requests that fit in it are reserved here, with no round
trip, and what they spend moves from the lease to the scope's spending every `flush_s` (one
Redis call for all scopes). The budget stays exact: room is only spent once it is reserved in
Redis, so strict budgets are never overrun, however many replicas lease.

Leases are only granted far from the limit: Redis grants one only while the scope keeps room
for `share` more of the same size, so near the limit every replica asks per request again and
the last cents go to whoever asks first. A scope that could not grow its lease is "tight": this
process gives back what its lease holds unused and asks per request for `retry_s`, then asks
for a lease again. An unused lease is given back after `idle_s`. A lease held by a gateway that
died expires like any reservation (see `redis_budgets.py`), whole: what the gateway spent since
its last call (at most `flush_s` or half a lease of requests) is then in the ledger but not in
Redis's counters, as with the reservations of requests it had served but not yet settled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from grifo.store.records import Amount, BudgetCheck

log = logging.getLogger("grifo.budgets")


@dataclass(slots=True, eq=False)
class Lease:
    """One scope's lease as this process sees it. `held` is what Redis holds for it (as of the
    last answer, less what was sent as spent since); requests still running hold `out` of it,
    finished ones spent `spent`, not yet sent. Room: held - out - spent."""

    check: BudgetCheck
    held_m: int = 0
    held_t: int = 0
    out_m: int = 0
    out_t: int = 0
    spent_m: int = 0
    spent_t: int = 0
    room_m: int = 0  # the room wanted, in worst cases of the requests that missed
    room_t: int = 0
    tight_until: float = 0.0
    used: float = 0.0

    def fits(self, worst: Amount) -> bool:
        return (
            self.held_m - self.out_m - self.spent_m >= worst.micros
            and self.held_t - self.out_t - self.spent_t >= worst.tokens
        )

    def low(self) -> bool:
        """Less than half the wanted room left: time to grow it again."""
        return (
            2 * (self.held_m - self.out_m - self.spent_m) < self.room_m
            or 2 * (self.held_t - self.out_t - self.spent_t) < self.room_t
        )


class LeaseChange(NamedTuple):
    """Sent for one lease: `spent` moves from the lease to the scope's spending; then the lease
    shrinks to `keep` if it holds more, and grows to `want` if the scope has room to spare.
    `held`: what this process counts the lease to hold once `spent` has moved (a store whose
    leases cannot expire takes it as the truth; Redis keeps its own)."""

    check: BudgetCheck
    spent: Amount
    keep: Amount
    want: Amount
    held: Amount


class LeaseAnswer(NamedTuple):
    """What the lease holds now; `tight`: it could not grow; `uncounted`: the scope has no
    counters yet (they are counted from the ledger before the next try)."""

    held: Amount
    tight: bool = False
    uncounted: bool = False


@runtime_checkable
class LeaseStore(Protocol):
    """Where leases are reserved: Redis (`store/redis_budgets.py`) for replicas, or the SQLite
    state database (`LocalReservations`) for the workers of one host."""

    async def lease(
        self, changes: list[LeaseChange], hold_s: float, share: int
    ) -> list[LeaseAnswer]:
        """Apply every change (growing a lease only while its scope keeps room for `share`
        more that size); raises `StoreUnavailableError`."""

    async def count(self, check: BudgetCheck) -> None:
        """Count a scope's spending from the ledger (its counters are missing)."""

    def forget_lease(self, check: BudgetCheck) -> None:
        """The lease's state is unknown (a call failed): drop it and recount the scope."""


class Leases:
    """This process's leases, one per budget scope and period."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        requests: int = 256,
        share: int = 8,
        flush_s: float = 0.05,
        idle_s: float = 2.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._requests = requests
        self.share = share
        self._flush_s = flush_s
        self._idle_s = idle_s
        self._retry_s = retry_s
        self._clock = clock
        self._leases: dict[tuple[str, int], Lease] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._flushing: asyncio.Task[None] | None = None
        self._again = False  # a flush was due while one was in flight
        self._hold_s = 0.0  # the longest request deadline seen: a lease outlives it
        self.taken = 0  # reservations taken from a lease (the rest asked Redis)

    def take(self, checks: list[BudgetCheck], worst: Amount, hold_s: float) -> list[Lease] | None:
        """Reserve `worst` from this process's leases of every check, or nothing (None: ask
        the store, and this process will ask for leases that would have fit)."""
        leases = []
        for check in checks:
            lease = self._leases.get((check.scope, check.period_start_ms))
            if lease is None or not lease.fits(worst):
                self._missed(checks, worst, hold_s)
                return None
            if lease.check is not check and lease.check != check:
                self._changed(lease, check)
                return None
            leases.append(lease)
        now = self._clock()
        low = False
        for lease in leases:
            lease.out_m += worst.micros
            lease.out_t += worst.tokens
            lease.used = now
            low = low or lease.low()
        self.taken += 1
        self._hold_s = max(self._hold_s, hold_s)
        if low:
            self._schedule(0.0)
        return leases

    def give_back(self, leases: list[Lease], reserved: Amount, actual: Amount) -> None:
        """A request taken from `leases` finished, spending `actual`."""
        for lease in leases:
            lease.out_m -= reserved.micros
            lease.out_t -= reserved.tokens
            lease.spent_m += actual.micros
            lease.spent_t += actual.tokens
        self._schedule(self._flush_s)

    def _changed(self, lease: Lease, check: BudgetCheck) -> None:
        """The budget changed (its limit or mode): the lease was granted under the old one.
        Give back what it holds unused, and ask per request for `retry_s`."""
        lease.check = check
        lease.tight_until = self._clock() + self._retry_s
        lease.room_m = lease.room_t = 0
        self._schedule(0.0)

    def _missed(self, checks: list[BudgetCheck], worst: Amount, hold_s: float) -> None:
        """Ask for leases that would have held this request, unless one of them is tight."""
        now = self._clock()
        leases = []
        for check in checks:
            key = (check.scope, check.period_start_ms)
            lease = self._leases.get(key)
            if lease is None:
                lease = self._leases[key] = Lease(check, used=now)
            if lease.tight_until > now:
                return
            leases.append(lease)
        for lease in leases:
            lease.room_m = max(lease.room_m, self._requests * worst.micros)
            lease.room_t = max(lease.room_t, self._requests * worst.tokens)
            lease.used = now
        self._hold_s = max(self._hold_s, hold_s)
        self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        """Flush within `delay` (an earlier flush already due stays)."""
        due = self._clock() + delay
        if self._timer is not None:
            if self._due <= due:
                return
            self._timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (shutting down): the close flushes
            return
        self._due = due
        self._timer = loop.call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._flushing is not None:  # one call at a time: the next follows it
            self._again = True
            return
        self._flushing = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing = None
        if not task.cancelled() and task.exception() is not None:
            log.error("budget lease flush failed: %s", type(task.exception()).__name__)
        if self._again:
            self._again = False
            self._schedule(0.0)
        elif self._leases:  # give back those gone idle
            self._schedule(self._idle_s / 2)

    async def flush(self, *, release: bool = False) -> None:
        """Send what was spent, and grow, keep or give back each lease (`release`: all)."""
        now = self._clock()
        changes: list[LeaseChange] = []
        sent: list[Lease] = []
        for key, lease in list(self._leases.items()):
            spent = Amount(lease.spent_m, lease.spent_t)
            held = Amount(lease.held_m - lease.spent_m, lease.held_t - lease.spent_t)
            lease.spent_m = lease.spent_t = 0
            idle = now - lease.used > self._idle_s
            if release or idle:
                lease.room_m = lease.room_t = 0
            if release or idle or lease.tight_until > now:
                # give back the room no request holds; none can be taken until the answer
                keep = want = Amount(min(held.micros, lease.out_m), min(held.tokens, lease.out_t))
            else:
                keep = held
                want = Amount(
                    max(held.micros, lease.out_m + lease.room_m),
                    max(held.tokens, lease.out_t + lease.room_t),
                )
            lease.held_m, lease.held_t = keep
            if spent == (0, 0) and keep == held and want == held:  # nothing to tell Redis
                unused = held == (0, 0) and not lease.out_m and not lease.out_t
                if unused and not lease.room_m and not lease.room_t and lease.tight_until <= now:
                    del self._leases[key]
                continue
            changes.append(LeaseChange(lease.check, spent, keep, want, held))
            sent.append(lease)
        if not changes:
            return
        try:
            answers = await self._store.lease(changes, self._hold_s, self.share)
        except Exception:
            # Unknown whether Redis applied them: forget these leases (the store drops them
            # and recounts the scopes from the ledger); requests still running on them
            # settle into leases nobody sends any more.
            for lease in sent:
                self._leases.pop((lease.check.scope, lease.check.period_start_ms), None)
                self._store.forget_lease(lease.check)
            raise
        for lease, change, answer in zip(sent, changes, answers, strict=True):
            lease.held_m, lease.held_t = answer.held
            if answer.uncounted:
                await self._store.count(change.check)
                self._schedule(0.0)
            elif answer.tight and lease.tight_until <= now:
                lease.tight_until = now + self._retry_s
                lease.room_m = lease.room_t = 0
                self._schedule(0.0)  # give back what it holds unused

    async def close(self) -> None:
        """Send what was spent and give every lease back (requests have finished)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        try:
            await self.flush(release=True)
        except Exception as exc:  # the leases expire in Redis; the ledger has the spending
            log.warning("could not give back budget leases: %s", type(exc).__name__)
