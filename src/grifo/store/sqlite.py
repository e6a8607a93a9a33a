"""The embedded state database: SQLite in WAL mode in the state directory.

Keys are stored as SHA-256 digests only. Also here: budgets' reservations, idempotency keys, and
ledger reads; ledger writes go through `ledger.py`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from grifo.store import background
from grifo.store.audit_sql import AUDIT_SCHEMA, KEYS_EXPIRY_SCHEMA, AuditTables
from grifo.store.host_lock import HostLock
from grifo.store.records import TOTAL_COLUMNS, LedgerEntry, StoredKey, StoredOutcome
from grifo.store.registry_sql import REGISTRY_SCHEMA, SQLITE_NOW, RegistryTables
from grifo.store.sqlite_budgets import BudgetTables

# Each step runs once per database, in order, inside one transaction; PRAGMA user_version says
# how many have run. Append new steps; never edit one that has shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    point TEXT NOT NULL,
    jurisdiction TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    status TEXT NOT NULL,
    usage_source TEXT NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_tenant_ts ON ledger (tenant, ts_ms);
CREATE TABLE IF NOT EXISTS budget_usage (
    scope TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    reserved_micros INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL,
    PRIMARY KEY (scope, period_start_ms)
);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    status INTEGER,
    headers TEXT,
    body BLOB,
    stream INTEGER,
    PRIMARY KEY (tenant, key)
);
""",
    """
ALTER TABLE budget_usage ADD COLUMN reserved_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE budget_usage ADD COLUMN spent_tokens INTEGER NOT NULL DEFAULT 0;
""",
    """
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'user';
""",
    AUDIT_SCHEMA,
    KEYS_EXPIRY_SCHEMA,
    REGISTRY_SCHEMA,
    """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
""",
)


# How long a statement waits for a lock held outside grifo's turns (`host_lock.py`): another
# program on the file, or a checkpoint.
BUSY_TIMEOUT_MS = 5000


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_MS)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date (safe when several processes open the database at once);
    returns the schema version. A database already up to date is only read: workers that
    start while others write need not wait for the write lock."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) == len(_MIGRATIONS):
        return len(_MIGRATIONS)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(_MIGRATIONS)


class SqliteLedger:
    """The ledger writer's connection (see `ledger.py`)."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._lock = HostLock(path)

    def write_entries(self, entries: list[LedgerEntry]) -> None:
        """One transaction; an entry already present (same request id) is left as it is."""
        with self._lock.transaction(self._conn):
            background.insert(self._conn, "INSERT OR IGNORE INTO ledger", entries)

    def close(self) -> None:
        self._conn.close()
        self._lock.close()


class StateDB(BudgetTables):
    """Keys and ledger of one gateway, in `<state-dir>/grifo.db`. Every write takes the
    connection's turn (`host_lock.py`): several workers write this file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)
        self._lock = HostLock(path)

    def open_ledger(self) -> SqliteLedger:
        """A connection of its own for the ledger writer's thread."""
        return SqliteLedger(self.path)

    def open_audit(self) -> AuditTables:
        """A connection of its own to the audit log's tables."""
        return AuditTables(connect(self.path), "?", HostLock(self.path))

    def open_registry(self) -> RegistryTables:
        """The registry of points that joined, on a connection of its own."""
        return RegistryTables(
            lambda: connect(self.path), "?", SQLITE_NOW, (sqlite3.Error,), HostLock(self.path)
        )

    # -- tenants made over the admin API ----------------------------------------------------------
    def put_tenant(self, name: str, config_json: str) -> bool:
        """Store a tenant's config (JSON of a `TenantConfig`); True if it is new."""
        now = int(time.time() * 1000)
        with self._lock:
            cursor = self._conn.execute(
                "INSERT INTO tenants (name, config, updated_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (name, config_json, now),
            )
            if cursor.rowcount == 1:
                return True
            self._conn.execute(
                "UPDATE tenants SET config = ?, updated_ms = ? WHERE name = ?",
                (config_json, now, name),
            )
        return False

    def delete_tenant(self, name: str) -> bool:
        with self._lock:
            cursor = self._conn.execute("DELETE FROM tenants WHERE name = ?", (name,))
        return cursor.rowcount == 1

    def stored_tenants(self) -> list[tuple[str, str]]:
        """(name, config JSON) of every stored tenant, by name."""
        with self._lock.thread:
            rows = self._conn.execute("SELECT name, config FROM tenants ORDER BY name").fetchall()
        return [(str(name), str(config)) for name, config in rows]

    # -- keys -------------------------------------------------------------------------------------
    def add_key(self, key: StoredKey) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (id, tenant, sha256, created_ms, role, expires_ms, models) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key[:3], int(time.time() * 1000), *key[3:]),
            )

    def revoke_keys(self, tenant: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE tenant = ? AND revoked_ms IS NULL",
                (int(time.time() * 1000), tenant),
            )

    def revoke_key(self, key_id: str) -> bool:
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                (int(time.time() * 1000), key_id),
            )
        return cursor.rowcount == 1

    def list_keys(self) -> list[tuple[str, str, int, int | None]]:
        """(key id, tenant, created ms, revoked ms or None) of every key, newest first."""
        with self._lock.thread:
            rows = self._conn.execute(
                "SELECT id, tenant, created_ms, revoked_ms FROM api_keys ORDER BY created_ms DESC"
            ).fetchall()
        return [(str(a), str(b), int(c), None if d is None else int(d)) for a, b, c, d in rows]

    def active_keys(self) -> list[StoredKey]:
        """Every key not revoked (expired ones too: the key ring refuses them with a reason)."""
        with self._lock.thread:
            rows = self._conn.execute(
                "SELECT id, tenant, sha256, role, expires_ms, models FROM api_keys "
                "WHERE revoked_ms IS NULL ORDER BY id"
            ).fetchall()
        return [StoredKey(*row) for row in rows]

    # -- idempotency keys -------------------------------------------------------------------------
    def claim_key(
        self, tenant: str, key: str, fingerprint: str, request_id: str, stale_ms: int
    ) -> StoredOutcome | None:
        """Claim (tenant, key) for a new request, or return what holds it already.

        An unfinished claim older than `stale_ms` (its gateway died) is taken over.
        """
        now = int(time.time() * 1000)
        with self._lock.transaction(self._conn):
            row = self._conn.execute(
                "SELECT fingerprint, request_id, started_ms, status, headers, body, stream "
                "FROM idempotency WHERE tenant = ? AND key = ?",
                (tenant, key),
            ).fetchone()
            if row is None or (row[3] is None and now - row[2] > stale_ms):
                self._conn.execute(
                    "INSERT OR REPLACE INTO idempotency (tenant, key, fingerprint, "
                    "request_id, started_ms) VALUES (?, ?, ?, ?, ?)",
                    (tenant, key, fingerprint, request_id, now),
                )
                return None
            return StoredOutcome(*row)

    def settle_key(
        self, tenant: str, key: str, status: int, headers: str, body: bytes, stream: bool
    ) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE idempotency SET status = ?, headers = ?, body = ?, stream = ? "
                "WHERE tenant = ? AND key = ?",
                (status, headers, body, int(stream), tenant, key),
            )

    def release_key(self, tenant: str, key: str, request_id: str) -> None:
        with self._lock:
            self._conn.execute(
                "DELETE FROM idempotency WHERE tenant = ? AND key = ? AND request_id = ? "
                "AND status IS NULL",
                (tenant, key, request_id),
            )

    def prune_keys(self, older_than_ms: int) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM idempotency WHERE started_ms < ?", (older_than_ms,))

    # -- ledger (reads, for tests and tools) ----------------------------------------------------
    def spent_since(self, tenant: str, since_ms: int) -> int:
        with self._lock.thread:
            row = self._conn.execute(
                "SELECT COALESCE(SUM(cost_micros), 0) FROM ledger WHERE tenant = ? AND ts_ms >= ?",
                (tenant, since_ms),
            ).fetchone()
        return int(row[0])

    def totals(
        self, by: str, since_ms: int = 0, tenant: str | None = None
    ) -> list[tuple[str, int, int, int, int]]:
        """(group, requests, prompt tokens, completion tokens, cost micro-USD) per group, of
        one tenant's requests or everyone's."""
        column = TOTAL_COLUMNS[by]  # a fixed name from a fixed set, never caller text
        with self._lock.thread:
            rows = self._conn.execute(
                f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "  # noqa: S608
                f"SUM(cost_micros) FROM ledger WHERE ts_ms >= ? AND (? IS NULL OR tenant = ?) "
                f"GROUP BY {column} ORDER BY SUM(cost_micros) DESC, {column}",
                (since_ms, tenant, tenant),
            ).fetchall()
        return [(str(g), int(n), int(p), int(c), int(m)) for g, n, p, c, m in rows]

    def ledger(self) -> list[LedgerEntry]:
        with self._lock.thread:
            rows = self._conn.execute("SELECT * FROM ledger ORDER BY ts_ms, request_id").fetchall()
        return [LedgerEntry._make(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        self._lock.close()
