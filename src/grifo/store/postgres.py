"""The shared state database for gateway replicas: PostgreSQL.

Holds what SQLite holds for one host (keys, the ledger, idempotency keys), so several gateways
see the same keys, answer a retried request from whichever served it first, and write one
ledger. Reservations against budgets live in Redis (`redis.py`), which every replica shares.

Every connection works in one schema (`store.postgres_schema`), created and migrated at start
under an advisory lock, so replicas starting together migrate once. When the database does not
answer, calls fail fast with `StoreUnavailableError` for `retry_s` instead of each waiting for
a connect timeout on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from grifo.errors import StoreUnavailableError
from grifo.store.audit_sql import AUDIT_SCHEMA, KEYS_EXPIRY_SCHEMA, AuditTables
from grifo.store.records import TOTAL_COLUMNS, Amount, LedgerEntry, StoredKey, StoredOutcome
from grifo.store.registry_sql import POSTGRES_NOW, REGISTRY_SCHEMA, RegistryTables

log = logging.getLogger("grifo.postgres")
T = TypeVar("T")
_LOCK_ID = 0x67726966  # advisory lock for migrations: "grif"

# Each step runs once per schema, in order, in one transaction; grifo_schema says how many ran.
# Append new steps; never edit one that has shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE TABLE ledger (
    request_id TEXT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    point TEXT NOT NULL,
    jurisdiction TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_micros BIGINT NOT NULL,
    status TEXT NOT NULL,
    usage_source TEXT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL
);
CREATE INDEX ledger_tenant_ts ON ledger (tenant, ts_ms);
CREATE INDEX ledger_key_ts ON ledger (key_id, ts_ms);
CREATE TABLE idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    status INTEGER,
    headers TEXT,
    body BYTEA,
    stream BOOLEAN,
    PRIMARY KEY (tenant, key)
);
""",
    """
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'user';
""",
    AUDIT_SCHEMA,
    KEYS_EXPIRY_SCHEMA,
    REGISTRY_SCHEMA,
    """
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
""",
)

_INSERT_LEDGER = (
    "INSERT INTO ledger VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (request_id) DO NOTHING"
)


def connect(url: str, schema: str, timeout_s: float = 2.0) -> psycopg.Connection[Any]:
    """An autocommit connection working in `schema` (see `migrate`)."""
    conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout_s)))
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn


def migrate(conn: psycopg.Connection[Any], schema: str) -> int:
    """Create `schema` and bring it up to date (once, when several gateways start together)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE IF NOT EXISTS grifo_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM grifo_schema").fetchone()
        version = 0 if row is None else int(row[0])
        for script in _MIGRATIONS[version:]:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement.encode())
        if row is None:
            conn.execute("INSERT INTO grifo_schema VALUES (%s)", (len(_MIGRATIONS),))
        else:
            conn.execute("UPDATE grifo_schema SET version = %s", (len(_MIGRATIONS),))
    return len(_MIGRATIONS)


class PostgresLedger:
    """The ledger writer's connection (see `ledger.py`)."""

    def __init__(self, url: str, schema: str) -> None:
        self._conn = connect(url, schema)

    def write_entries(self, entries: list[LedgerEntry]) -> None:
        """One transaction; an entry already present (same request id) is left as it is."""
        with self._conn.transaction(), self._conn.cursor() as cursor:
            cursor.executemany(_INSERT_LEDGER, entries)

    def close(self) -> None:
        self._conn.close()


class PostgresDB:
    """Keys, idempotency keys and ledger reads in PostgreSQL, for one gateway process."""

    def __init__(self, url: str, schema: str, *, retry_s: float = 1.0) -> None:
        self.url, self.schema = url, schema
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._down_until = 0.0
        try:
            self._conn: psycopg.Connection[Any] | None = connect(url, schema)
            migrate(self._conn, schema)
        except psycopg.OperationalError:
            where = psycopg.conninfo.conninfo_to_dict(url)
            raise StoreUnavailableError(
                f"cannot reach the PostgreSQL database at {where.get('host', 'localhost')}:"
                f"{where.get('port', 5432)}"
            ) from None

    def open_ledger(self) -> PostgresLedger:
        return PostgresLedger(self.url, self.schema)

    def open_audit(self) -> AuditTables:
        return AuditTables(connect(self.url, self.schema), "%s")

    def open_registry(self) -> RegistryTables:
        """The registry of points that joined, on a connection of its own (made again after
        the database was away)."""
        return RegistryTables(
            lambda: connect(self.url, self.schema), "%s", POSTGRES_NOW, (psycopg.Error,)
        )

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`work` on the connection, reconnecting once it is lost; fails fast while down."""
        with self._lock:
            if time.monotonic() < self._down_until:
                raise StoreUnavailableError("the state database is unavailable; retry shortly")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.url, self.schema)
                return work(self._conn)
            except psycopg.OperationalError as exc:
                log.warning("state database unavailable: %s", type(exc).__name__)
                self._down_until = time.monotonic() + self._retry_s
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise StoreUnavailableError(
                    "the state database is unavailable; retry shortly"
                ) from None

    # -- tenants made over the admin API ----------------------------------------------------------
    def put_tenant(self, name: str, config_json: str) -> bool:
        """Store a tenant's config (JSON of a `TenantConfig`); True if it is new."""
        row = self._run(
            lambda c: c.execute(
                "INSERT INTO tenants (name, config, updated_ms) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET config = EXCLUDED.config, "
                "updated_ms = EXCLUDED.updated_ms RETURNING (xmax = 0)",
                (name, config_json, _now_ms()),
            ).fetchone()
        )
        return bool(row and row[0])

    def delete_tenant(self, name: str) -> bool:
        cursor = self._run(lambda c: c.execute("DELETE FROM tenants WHERE name = %s", (name,)))
        return cursor.rowcount == 1

    def stored_tenants(self) -> list[tuple[str, str]]:
        """(name, config JSON) of every stored tenant, by name."""
        rows = self._run(
            lambda c: c.execute("SELECT name, config FROM tenants ORDER BY name").fetchall()
        )
        return [(str(name), str(config)) for name, config in rows]

    # -- keys -------------------------------------------------------------------------------------
    def add_key(self, key: StoredKey) -> None:
        self._run(
            lambda c: c.execute(
                "INSERT INTO api_keys (id, tenant, sha256, created_ms, role, expires_ms, models) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (*key[:3], _now_ms(), *key[3:]),
            )
        )

    def revoke_keys(self, tenant: str) -> None:
        self._run(
            lambda c: c.execute(
                "UPDATE api_keys SET revoked_ms = %s WHERE tenant = %s AND revoked_ms IS NULL",
                (_now_ms(), tenant),
            )
        )

    def revoke_key(self, key_id: str) -> bool:
        cursor = self._run(
            lambda c: c.execute(
                "UPDATE api_keys SET revoked_ms = %s WHERE id = %s AND revoked_ms IS NULL",
                (_now_ms(), key_id),
            )
        )
        return cursor.rowcount == 1

    def list_keys(self) -> list[tuple[str, str, int, int | None]]:
        rows = self._run(
            lambda c: c.execute(
                "SELECT id, tenant, created_ms, revoked_ms FROM api_keys ORDER BY created_ms DESC"
            ).fetchall()
        )
        return [(str(a), str(b), int(c), None if d is None else int(d)) for a, b, c, d in rows]

    def active_keys(self) -> list[StoredKey]:
        rows = self._run(
            lambda c: c.execute(
                "SELECT id, tenant, sha256, role, expires_ms, models FROM api_keys "
                "WHERE revoked_ms IS NULL ORDER BY id"
            ).fetchall()
        )
        return [StoredKey(*row) for row in rows]

    # -- idempotency keys -------------------------------------------------------------------------
    def claim_key(
        self, tenant: str, key: str, fingerprint: str, request_id: str, stale_ms: int
    ) -> StoredOutcome | None:
        """Claim (tenant, key) for a new request, or return what holds it already (an
        unfinished claim older than `stale_ms` is taken over)."""
        now = _now_ms()

        def claim(c: psycopg.Connection[Any]) -> StoredOutcome | None:
            with c.transaction():
                c.execute(
                    "INSERT INTO idempotency (tenant, key, fingerprint, request_id, started_ms) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (tenant, key, fingerprint, request_id, now),
                )
                row = c.execute(
                    "SELECT fingerprint, request_id, started_ms, status, headers, body, stream "
                    "FROM idempotency WHERE tenant = %s AND key = %s FOR UPDATE",
                    (tenant, key),
                ).fetchone()
                assert row is not None
                if row[1] == request_id:
                    return None
                if row[3] is None and now - int(row[2]) > stale_ms:
                    c.execute(
                        "UPDATE idempotency SET fingerprint = %s, request_id = %s, "
                        "started_ms = %s WHERE tenant = %s AND key = %s",
                        (fingerprint, request_id, now, tenant, key),
                    )
                    return None
                body = None if row[5] is None else bytes(row[5])
                stream = None if row[6] is None else int(row[6])
                return StoredOutcome(row[0], row[1], int(row[2]), row[3], row[4], body, stream)

        return self._run(claim)

    def settle_key(
        self, tenant: str, key: str, status: int, headers: str, body: bytes, stream: bool
    ) -> None:
        self._run(
            lambda c: c.execute(
                "UPDATE idempotency SET status = %s, headers = %s, body = %s, stream = %s "
                "WHERE tenant = %s AND key = %s",
                (status, headers, body, stream, tenant, key),
            )
        )

    def release_key(self, tenant: str, key: str, request_id: str) -> None:
        self._run(
            lambda c: c.execute(
                "DELETE FROM idempotency WHERE tenant = %s AND key = %s AND request_id = %s "
                "AND status IS NULL",
                (tenant, key, request_id),
            )
        )

    def prune_keys(self, older_than_ms: int) -> None:
        self._run(
            lambda c: c.execute("DELETE FROM idempotency WHERE started_ms < %s", (older_than_ms,))
        )

    # -- ledger reads -----------------------------------------------------------------------------
    def spent(self, scope: str, since_ms: int) -> Amount:
        """Micro-USD and tokens a `tenant:<name>` or `key:<id>` scope spent since `since_ms`."""
        kind, name = scope.split(":", 1)
        column = sql.Identifier("tenant" if kind == "tenant" else "key_id")
        query = sql.SQL(
            "SELECT COALESCE(SUM(cost_micros), 0), "
            "COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
            "FROM ledger WHERE {} = %s AND ts_ms >= %s"
        ).format(column)
        row = self._run(lambda c: c.execute(query, (name, since_ms)).fetchone())
        assert row is not None
        return Amount(int(row[0]), int(row[1]))

    def spent_since(self, tenant: str, since_ms: int) -> int:
        return self.spent(f"tenant:{tenant}", since_ms).micros

    def totals(
        self, by: str, since_ms: int = 0, tenant: str | None = None
    ) -> list[tuple[str, int, int, int, int]]:
        """(group, requests, prompt tokens, completion tokens, cost micro-USD) per group, of
        one tenant's requests or everyone's."""
        column = sql.Identifier(TOTAL_COLUMNS[by])
        query = sql.SQL(
            "SELECT {col}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(cost_micros) FROM ledger WHERE ts_ms >= %s "
            "AND (%s::text IS NULL OR tenant = %s) GROUP BY {col} "
            "ORDER BY SUM(cost_micros) DESC, {col}"
        ).format(col=column)
        rows = self._run(lambda c: c.execute(query, (since_ms, tenant, tenant)).fetchall())
        return [(str(g), int(n), int(p), int(c), int(m)) for g, n, p, c, m in rows]

    def ledger(self) -> list[LedgerEntry]:
        rows = self._run(
            lambda c: c.execute("SELECT * FROM ledger ORDER BY ts_ms, request_id").fetchall()
        )
        return [LedgerEntry._make(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def _now_ms() -> int:
    return int(time.time() * 1000)
