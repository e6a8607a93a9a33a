"""Budget reservations in the SQLite state database (`StateDB` mixes this in).

One row per scope and period holds reserved and spent micro-USD and tokens; spending is
counted from the ledger the first time a scope is seen after a start.
"""

from __future__ import annotations

import sqlite3

from grifo.store.host_lock import HostLock
from grifo.store.records import Amount, BudgetCheck


class BudgetTables:
    _conn: sqlite3.Connection
    _lock: HostLock

    def reset_reservations(self) -> None:
        """No request survives a restart: forget reservations and recount spending from the
        ledger when next needed (the ledger is the source of truth)."""
        with self._lock:
            self._conn.execute("DELETE FROM budget_usage")

    def reserve(self, checks: list[BudgetCheck], worst: Amount) -> BudgetCheck | None:
        """Atomically reserve `worst` (micro-USD and tokens) in every scope, or nothing:
        returns the first check that refused."""
        return self.reserve_many([(checks, worst)])[0]

    def reserve_many(
        self, asks: list[tuple[list[BudgetCheck], Amount]]
    ) -> list[BudgetCheck | None]:
        """`reserve` for each ask in order, all in one transaction: each scope's row is read
        once, the asks are decided against running totals, and each scope written once."""
        results: list[BudgetCheck | None] = []
        with self._lock.transaction(self._conn):
            usage: dict[tuple[str, int], list[int]] = {}  # rm, rt, sm, st
            for checks, worst in asks:
                rows = [self._row(usage, c) for c in checks]
                results.append(take(checks, rows, worst))
            self._conn.executemany(
                "UPDATE budget_usage SET reserved_micros = ?, reserved_tokens = ? "
                "WHERE scope = ? AND period_start_ms = ?",
                [(row[0], row[1], *key) for key, row in usage.items()],
            )
        return results

    def lease_many(
        self, changes: list[tuple[BudgetCheck, Amount, Amount, Amount, Amount]], share: int
    ) -> list[tuple[Amount, bool]]:
        """A worker's budget leases (see `admission/leases.py`), in one transaction: per
        (check, spent, keep, want, held), `spent` moves from the lease (which holds `held`
        after it) to the scope's spending, the lease shrinks to `keep`, then grows to `want` if
        the scope keeps room for `share` more that size. Per lease: what it holds, and whether
        it could not grow. Only its worker writes a lease; a restart forgets them all."""
        answers: list[tuple[Amount, bool]] = []
        with self._lock.transaction(self._conn):
            usage: dict[tuple[str, int], list[int]] = {}  # rm, rt, sm, st
            for check, spent, keep, want, held in changes:
                row = self._row(usage, check)
                new = [min(keep.micros, held.micros), min(keep.tokens, held.tokens)]
                row[0] -= spent.micros + held.micros - new[0]
                row[1] -= spent.tokens + held.tokens - new[1]
                row[2] += spent.micros
                row[3] += spent.tokens
                grow = [max(want.micros - new[0], 0), max(want.tokens - new[1], 0)]
                tight = False
                if grow != [0, 0]:
                    wanted = [new[0] + grow[0], new[1] + grow[1]]
                    limits = (check.limit_micros, check.limit_tokens)
                    if all(
                        limit is None or limit - row[i] - row[i + 2] - grow[i] >= share * wanted[i]
                        for i, limit in enumerate(limits)
                    ):
                        row[0] += grow[0]
                        row[1] += grow[1]
                        new = wanted
                    else:
                        tight = True
                answers.append((Amount(new[0], new[1]), tight))
            self._conn.executemany(
                "UPDATE budget_usage SET reserved_micros = ?, reserved_tokens = ?, "
                "spent_micros = ?, spent_tokens = ? WHERE scope = ? AND period_start_ms = ?",
                [(*row, *key) for key, row in usage.items()],
            )
        return answers

    def _row(self, usage: dict[tuple[str, int], list[int]], check: BudgetCheck) -> list[int]:
        key = (check.scope, check.period_start_ms)
        row = usage.get(key)
        if row is None:
            reserved, spent = self._usage(check)
            row = usage[key] = [reserved.micros, reserved.tokens, spent.micros, spent.tokens]
        return row

    def settle(self, checks: list[BudgetCheck], reserved: Amount, actual: Amount) -> None:
        self.settle_many([(checks, reserved, actual)])

    def settle_many(self, items: list[tuple[list[BudgetCheck], Amount, Amount]]) -> None:
        """Give back each reservation and count what was spent, in one transaction."""
        deltas: dict[tuple[str, int], list[int]] = {}
        for checks, r, a in items:
            for c in checks:
                d = deltas.setdefault((c.scope, c.period_start_ms), [0, 0, 0, 0])
                d[0] += r.micros
                d[1] += a.micros
                d[2] += r.tokens
                d[3] += a.tokens
        rows = [(*d, *key) for key, d in deltas.items()]
        with self._lock.transaction(self._conn):
            self._conn.executemany(
                "UPDATE budget_usage SET reserved_micros = reserved_micros - ?, "
                "spent_micros = spent_micros + ?, reserved_tokens = reserved_tokens - ?, "
                "spent_tokens = spent_tokens + ? WHERE scope = ? AND period_start_ms = ?",
                rows,
            )

    def _usage(self, check: BudgetCheck) -> tuple[Amount, Amount]:
        """(reserved, spent) in a scope's period; spent is counted from the ledger the first
        time a scope is seen (after a restart)."""
        row = self._conn.execute(
            "SELECT reserved_micros, reserved_tokens, spent_micros, spent_tokens "
            "FROM budget_usage WHERE scope = ? AND period_start_ms = ?",
            (check.scope, check.period_start_ms),
        ).fetchone()
        if row is not None:
            return Amount(int(row[0]), int(row[1])), Amount(int(row[2]), int(row[3]))
        spent = self._ledger_spent(check.scope, check.period_start_ms)
        self._conn.execute(
            "INSERT INTO budget_usage (scope, period_start_ms, reserved_micros, spent_micros, "
            "reserved_tokens, spent_tokens) VALUES (?, ?, 0, ?, 0, ?)",
            (check.scope, check.period_start_ms, spent.micros, spent.tokens),
        )
        return Amount(0, 0), spent

    def save_usage(self, rows: dict[tuple[str, int], list[int]]) -> None:
        """Write counters kept elsewhere (a single process's, see `ProcessReservations`):
        `rows` maps (scope, period start) to reserved and spent micro-USD and tokens."""
        with self._lock.transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO budget_usage (scope, period_start_ms, "
                "reserved_micros, reserved_tokens, spent_micros, spent_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(*key, *row) for key, row in rows.items()],
            )

    def spent(self, scope: str, since_ms: int) -> Amount:
        """Micro-USD and tokens a `tenant:<name>` or `key:<id>` scope spent since `since_ms`."""
        with self._lock.thread:
            return self._ledger_spent(scope, since_ms)

    def _ledger_spent(self, scope: str, since_ms: int) -> Amount:
        column = "tenant" if scope.startswith("tenant:") else "key_id"
        micros, tokens = self._conn.execute(
            "SELECT COALESCE(SUM(cost_micros), 0), "  # noqa: S608 (column from a fixed pair)
            f"COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM ledger WHERE {column} = ? "
            "AND ts_ms >= ?",
            (scope.split(":", 1)[1], since_ms),
        ).fetchone()
        return Amount(int(micros), int(tokens))


def take(checks: list[BudgetCheck], rows: list[list[int]], worst: Amount) -> BudgetCheck | None:
    """Reserve `worst` in every row (one per check), or in none: the check that refused."""
    for check, row in zip(checks, rows, strict=True):
        if not fits(check, row, worst):
            return check
    for row in rows:
        row[0] += worst.micros
        row[1] += worst.tokens
    return None


def fits(check: BudgetCheck, row: list[int], worst: Amount) -> bool:
    """strict: committed + worst within the limit; soft: committed still under it.
    `row`: reserved micros, reserved tokens, spent micros, spent tokens."""
    limit = check.limit_micros
    if limit is not None and row[0] + row[2] + (worst.micros if check.strict else 1) > limit:
        return False
    limit = check.limit_tokens
    return limit is None or row[1] + row[3] + (worst.tokens if check.strict else 1) <= limit
