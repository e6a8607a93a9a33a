"""The registry of points that joined at run time (`registered_points`), in SQLite or PostgreSQL.

One row per point name: which join token registered it, what it said it is (a `PointConfig` as
JSON), the address the gateway vetted for its URL, its last load signals, and when it last
heartbeat. Times are the database's clock, so replicas on hosts with skewed clocks agree on
which registrations have expired. Every write is one statement: the rule that a live name
belongs to the token that registered it holds across replicas without explicit locking.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from grifo.errors import StoreUnavailableError
from grifo.store.audit_sql import Connection
from grifo.store.host_lock import HostLock

T = TypeVar("T")

# A migration step of both databases (see their _MIGRATIONS): never edit it once shipped.
REGISTRY_SCHEMA = """
CREATE TABLE registered_points (
    name TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    identity TEXT NOT NULL,
    address TEXT NOT NULL,
    signals TEXT NOT NULL,
    registered_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL
)
"""

SQLITE_NOW = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
POSTGRES_NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"


class RegisteredRow(NamedTuple):
    name: str
    token_id: str
    identity: str  # a PointConfig, JSON
    address: str  # the IP address its URL's host resolved to when it registered
    signals: str  # its last heartbeat's load signals, JSON
    heartbeat_ms: int  # the database's clock
    age_ms: int  # since that heartbeat, by the database's clock now


class RegistryTables:
    """The registry on a connection of its own (made by `connect`, again after a failure);
    `ph` is the driver's placeholder, `now` the database's clock in ms as SQL; `lock`: SQLite's
    writers take turns through it (see `host_lock.py`)."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        ph: str,
        now: str,
        errors: tuple[type[Exception], ...],
        lock: HostLock | None = None,
    ) -> None:
        self._connect = connect
        self._ph = ph
        self._now = now
        self._errors = errors
        self._lock: threading.Lock | HostLock = lock or threading.Lock()
        self._conn: Connection | None = None

    def _run(self, sql: str, params: tuple[Any, ...], work: Callable[[Any], T]) -> T:
        query = sql.replace("?", self._ph).replace("NOW", self._now)
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                return work(self._conn.execute(query, params))
            except self._errors as exc:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise StoreUnavailableError(
                    f"the point registry is unavailable ({type(exc).__name__}); retry shortly"
                ) from None

    def register(
        self, name: str, token_id: str, identity: str, address: str, expire_ms: int
    ) -> bool:
        """Record a registration; False when the name is held by another token's registration
        that has not expired (a registration by the same token is replaced)."""
        return self._run(
            "INSERT INTO registered_points (name, token_id, identity, address, signals, "
            "registered_ms, heartbeat_ms) VALUES (?, ?, ?, ?, '{}', NOW, NOW) "
            "ON CONFLICT (name) DO UPDATE SET token_id = excluded.token_id, "
            "identity = excluded.identity, address = excluded.address, "
            "signals = excluded.signals, registered_ms = excluded.registered_ms, "
            "heartbeat_ms = excluded.heartbeat_ms "
            "WHERE registered_points.token_id = excluded.token_id "
            "OR registered_points.heartbeat_ms < excluded.heartbeat_ms - ?",
            (name, token_id, identity, address, expire_ms),
            _changed,
        )

    def heartbeat(self, name: str, token_id: str, signals: str, expire_ms: int) -> bool:
        """A live registration's heartbeat; False when there is none (never registered, by
        another token, deregistered or expired: the point registers again)."""
        return self._run(
            "UPDATE registered_points SET signals = ?, heartbeat_ms = NOW "
            "WHERE name = ? AND token_id = ? AND heartbeat_ms >= NOW - ?",
            (signals, name, token_id, expire_ms),
            _changed,
        )

    def deregister(self, name: str, token_id: str) -> bool:
        return self._run(
            "DELETE FROM registered_points WHERE name = ? AND token_id = ?",
            (name, token_id),
            _changed,
        )

    def rows(self) -> list[RegisteredRow]:
        """Every registration, expired ones too (their age says so), by name."""
        return self._run(
            "SELECT name, token_id, identity, address, signals, heartbeat_ms, "
            "NOW - heartbeat_ms FROM registered_points ORDER BY name",
            (),
            lambda cursor: [
                RegisteredRow(a, b, c, d, e, int(f), int(g)) for a, b, c, d, e, f, g in cursor
            ],
        )

    def sweep(self, older_than_ms: int) -> int:
        """Delete registrations without a heartbeat for `older_than_ms`; how many."""
        return self._run(
            "DELETE FROM registered_points WHERE heartbeat_ms < NOW - ?",
            (older_than_ms,),
            _changed_count,
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
        if isinstance(self._lock, HostLock):
            self._lock.close()


def _changed(cursor: Any) -> bool:
    return int(cursor.rowcount) > 0


def _changed_count(cursor: Any) -> int:
    return max(0, int(cursor.rowcount))
