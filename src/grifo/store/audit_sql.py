"""The audit log's tables (`audit_records`, `audit_checkpoints`) in SQLite or PostgreSQL.

Writes go through `RecordWriter`s (spool, batches, replay) like the ledger; an existing row
(same log and seq, or log and size) is left as it is, so replays are harmless.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

from grifo.audit.record import AuditRow, CheckpointRow
from grifo.store import background
from grifo.store.host_lock import HostLock

# A migration step of both databases (see their _MIGRATIONS): never edit it once shipped.
AUDIT_SCHEMA = """
CREATE TABLE audit_records (
    log TEXT NOT NULL,
    seq BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    record TEXT NOT NULL,
    entry_hash TEXT NOT NULL,
    leaf_hash TEXT NOT NULL,
    PRIMARY KEY (log, seq)
);
CREATE INDEX audit_tenant_ts ON audit_records (tenant, ts_ms);
CREATE TABLE audit_checkpoints (
    log TEXT NOT NULL,
    size BIGINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    note TEXT NOT NULL,
    peaks TEXT NOT NULL,
    PRIMARY KEY (log, size)
);
"""

# Key expiry and per-key model allow-lists (a migration step of both databases).
KEYS_EXPIRY_SCHEMA = """
ALTER TABLE api_keys ADD COLUMN expires_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN models TEXT NOT NULL DEFAULT ''
"""


class Connection(Protocol):
    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


class AuditTables:
    """Reads and writes on one connection; `ph` is the driver's placeholder (`?` or `%s`);
    `lock`: SQLite's writers take turns through it (see `host_lock.py`)."""

    def __init__(self, conn: Connection, ph: str, lock: HostLock | None = None) -> None:
        self._conn = conn
        self._ph = ph
        self._lock = lock

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._ph)

    def _insert(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """The rows into `table`, each one not already there (same key)."""
        if not rows:
            return
        if isinstance(self._conn, sqlite3.Connection):
            assert self._lock is not None, "SQLite's tables are opened with their lock"
            with self._lock.transaction(self._conn):
                background.insert(self._conn, f"INSERT OR IGNORE INTO {table}", rows)
            return
        conn: Any = self._conn
        values = ", ".join([self._ph] * len(rows[0]))
        sql = f"INSERT INTO {table} VALUES ({values}) ON CONFLICT DO NOTHING"  # noqa: S608 (ours)
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(sql, rows)

    def write_records(self, rows: Sequence[AuditRow]) -> None:
        self._insert("audit_records", rows)

    def write_checkpoints(self, rows: Sequence[CheckpointRow]) -> None:
        self._insert("audit_checkpoints", rows)

    def prune(self, before_ms: int) -> int:
        """Drop the content of records older than `before_ms`, keeping their hashes (the chain
        and the Merkle tree stay verifiable); returns how many were pruned."""
        with self._lock or nullcontext():
            cursor = self._conn.execute(
                self._q("UPDATE audit_records SET record = '' WHERE ts_ms < ? AND record <> ''"),
                (before_ms,),
            )
        return int(cursor.rowcount)

    def last_checkpoint(self, log: str) -> CheckpointRow | None:
        row = self._conn.execute(
            self._q(
                "SELECT log, size, ts_ms, note, peaks FROM audit_checkpoints WHERE log = ? "
                "ORDER BY size DESC LIMIT 1"
            ),
            (log,),
        ).fetchone()
        return None if row is None else CheckpointRow(*row)

    def records_from(self, log: str, seq: int) -> list[AuditRow]:
        """Records of `log` with sequence numbers from `seq` on, in order."""
        rows = self._conn.execute(
            self._q("SELECT * FROM audit_records WHERE log = ? AND seq >= ? ORDER BY seq"),
            (log, seq),
        ).fetchall()
        return [AuditRow(*r) for r in rows]

    def logs(self) -> list[str]:
        rows = self._conn.execute("SELECT DISTINCT log FROM audit_records ORDER BY log").fetchall()
        return [str(r[0]) for r in rows]

    def checkpoints(self, log: str) -> list[CheckpointRow]:
        rows = self._conn.execute(
            self._q("SELECT * FROM audit_checkpoints WHERE log = ? ORDER BY size"), (log,)
        ).fetchall()
        return [CheckpointRow(*r) for r in rows]

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.close()


class RecordSink:
    """The audit writer's connection for records."""

    def __init__(self, tables: AuditTables) -> None:
        self._tables = tables

    def write_entries(self, entries: list[AuditRow]) -> None:
        self._tables.write_records(entries)

    def close(self) -> None:
        self._tables.close()


class CheckpointSink:
    """The audit writer's connection for checkpoints."""

    def __init__(self, tables: AuditTables) -> None:
        self._tables = tables

    def write_entries(self, entries: list[CheckpointRow]) -> None:
        self._tables.write_checkpoints(entries)

    def close(self) -> None:
        self._tables.close()


def iter_logs(tables: AuditTables) -> Iterator[tuple[str, list[AuditRow], list[CheckpointRow]]]:
    """Every log with all its records and checkpoints (for export)."""
    for log in tables.logs():
        yield log, tables.records_from(log, 0), tables.checkpoints(log)


OpenTables = Callable[[], AuditTables]
