"""Where budget reservations are counted, and group commit in front of it.

A store takes reservations and settlements in batches: the state database (SQLite, one host)
in one transaction per batch, Redis (replicas) in one script call per batch. `Batched` gathers
what the requests of one event-loop turn ask for and sends it as one batch, with at most one
batch of reservations in flight: requests that arrive meanwhile form the next. Each ask is still
decided on its own and in order, so a budget is exactly as strict as with one call per request,
for a fraction of the cost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from grifo.admission.leases import LeaseAnswer, LeaseChange
from grifo.store.records import Amount, Ask, BudgetCheck, Settlement
from grifo.store.sqlite import StateDB
from grifo.store.sqlite_budgets import take

log = logging.getLogger("grifo.budgets")


class BudgetStore(Protocol):
    """Reserves each ask in order (None: reserved, else the check that refused it)."""

    async def reserve_many(self, asks: list[Ask]) -> list[BudgetCheck | None]: ...

    def settle_many(self, settlements: list[Settlement]) -> None:
        """May complete in the background."""

    @property
    def up(self) -> bool: ...

    async def close(self) -> None: ...


class LocalReservations:
    """Reservations in the SQLite state database, shared by the workers of one host; each
    worker's leases (`admission/leases.py`) are part of its reserved counters."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self.up = True

    async def reserve_many(self, asks: list[Ask]) -> list[BudgetCheck | None]:
        return self._db.reserve_many([(a.checks, a.worst) for a in asks])

    def settle_many(self, settlements: list[Settlement]) -> None:
        self._db.settle_many([(s.checks, s.reserved, s.actual) for s in settlements])

    async def lease(
        self, changes: list[LeaseChange], hold_s: float, share: int
    ) -> list[LeaseAnswer]:
        """No expiry (`hold_s`): a dead worker's leases, like its reservations, stay counted
        until the gateway starts again and forgets them all (`reset_reservations`)."""
        rows = [(c.check, c.spent, c.keep, c.want, c.held) for c in changes]
        answers = self._db.lease_many(rows, share)
        return [LeaseAnswer(held, tight) for held, tight in answers]

    async def count(self, check: BudgetCheck) -> None:
        pass  # the state database counts a scope from the ledger when it first sees it

    def forget_lease(self, check: BudgetCheck) -> None:
        # The transaction was rolled back (or committed just before the error): the lease's
        # room, what it spent included, stays reserved until the next start (never overspent).
        log.warning("a budget lease in the state database is in an unknown state: %s", check.scope)

    async def close(self) -> None:
        pass  # the state database is closed by its owner


class ProcessReservations:
    """Reservations in this process's memory, for a gateway that is the only process spending
    its budgets (`grifo serve` without `--workers`, no Redis): as strict as the database, since
    one event loop decides every ask in order, without a transaction per batch. Spending is
    counted from the ledger the first time a scope is seen, as the database store does, and the
    counters are written to the state database's `budget_usage` when the gateway stops."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self._rows: dict[tuple[str, int], list[int]] = {}  # reserved µ, tokens, spent µ, tokens
        self.up = True
        self.store = self  # the surface of `Batched`, without the batching

    async def reserve(self, ask: Ask) -> BudgetCheck | None:
        return take(ask.checks, self.rows(ask.checks), ask.worst)

    def rows(self, checks: list[BudgetCheck]) -> list[list[int]]:
        """The counters of `checks` (the same lists every time: a caller may keep them)."""
        return [self._row(check) for check in checks]

    @staticmethod
    def give_back(rows: list[list[int]], reserved: Amount, actual: Amount) -> None:
        for row in rows:
            row[0] -= reserved.micros
            row[1] -= reserved.tokens
            row[2] += actual.micros
            row[3] += actual.tokens

    def settle(self, settlement: Settlement) -> None:
        self.give_back(self.rows(settlement.checks), settlement.reserved, settlement.actual)

    def _row(self, check: BudgetCheck) -> list[int]:
        key = (check.scope, check.period_start_ms)
        row = self._rows.get(key)
        if row is None:
            spent = self._db.spent(check.scope, check.period_start_ms)
            row = self._rows[key] = [0, 0, spent.micros, spent.tokens]
        return row

    def flush(self) -> None:
        pass  # nothing waits: every settlement is counted when it happens

    async def close(self) -> None:
        self._db.save_usage(self._rows)


class Batched:
    """Group commit of reservations and settlements in front of a `BudgetStore`."""

    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        self._asks: list[tuple[Ask, asyncio.Future[BudgetCheck | None]]] = []
        self._reserving = False
        self._settlements: list[Settlement] = []
        self._settling = False
        self.batches = 0

    async def reserve(self, ask: Ask) -> BudgetCheck | None:
        future: asyncio.Future[BudgetCheck | None] = asyncio.get_running_loop().create_future()
        self._asks.append((ask, future))
        if not self._reserving:
            self._reserving = True
            asyncio.get_running_loop().create_task(self._reserve_batches())
        return await future

    async def _reserve_batches(self) -> None:
        """Runs one loop turn after the first ask: everything asked by then is one batch."""
        try:
            while self._asks:
                batch, self._asks = self._asks, []
                self.batches += 1
                try:
                    results = await self.store.reserve_many([ask for ask, _ in batch])
                except Exception as exc:  # the store's failure is each request's failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (ask, future), refused in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(refused)
                    elif refused is None:  # the request is gone: give the reservation back
                        self.settle(Settlement(ask.checks, ask.request_id, ask.worst, Amount(0, 0)))
        finally:
            self._reserving = False

    def settle(self, settlement: Settlement) -> None:
        self._settlements.append(settlement)
        if self._settling:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (shutting down): write now
            self.flush()
            return
        self._settling = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send the settlements gathered so far."""
        self._settling = False
        batch, self._settlements = self._settlements, []
        if batch:
            try:
                self.store.settle_many(batch)
            except Exception:  # a lost settle is recounted from the ledger at the next start
                log.exception("could not settle %d budget reservations", len(batch))
