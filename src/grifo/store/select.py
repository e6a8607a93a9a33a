"""Which stores a gateway uses, from `gateway.store`: SQLite by default, PostgreSQL and Redis
when replicas share state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from grifo.config.model import StoreConfig
from grifo.store.audit_sql import AuditTables
from grifo.store.ledger import LedgerSink
from grifo.store.records import Amount, LedgerEntry, StoredKey, StoredOutcome
from grifo.store.registry_sql import RegistryTables


def resolve_state_dir(given: Path | None = None) -> Path:
    """The state directory: `given` (a `--state-dir`), else $GRIFO_STATE_DIR, else ./.grifo."""
    return given or Path(os.environ.get("GRIFO_STATE_DIR") or ".grifo")


class StateStore(Protocol):
    """Keys, idempotency keys and ledger reads; both `StateDB` and `PostgresDB` are one."""

    def open_ledger(self) -> LedgerSink: ...

    def open_audit(self) -> AuditTables: ...

    def open_registry(self) -> RegistryTables: ...

    def put_tenant(self, name: str, config_json: str) -> bool: ...

    def delete_tenant(self, name: str) -> bool: ...

    def stored_tenants(self) -> list[tuple[str, str]]: ...

    def add_key(self, key: StoredKey) -> None: ...

    def revoke_keys(self, tenant: str) -> None: ...

    def revoke_key(self, key_id: str) -> bool: ...

    def list_keys(self) -> list[tuple[str, str, int, int | None]]: ...

    def active_keys(self) -> list[StoredKey]: ...

    def claim_key(
        self, tenant: str, key: str, fingerprint: str, request_id: str, stale_ms: int
    ) -> StoredOutcome | None: ...

    def settle_key(
        self, tenant: str, key: str, status: int, headers: str, body: bytes, stream: bool
    ) -> None: ...

    def release_key(self, tenant: str, key: str, request_id: str) -> None: ...

    def prune_keys(self, older_than_ms: int) -> None: ...

    def spent(self, scope: str, since_ms: int) -> Amount: ...

    def spent_since(self, tenant: str, since_ms: int) -> int: ...

    def totals(
        self, by: str, since_ms: int = 0, tenant: str | None = None
    ) -> list[tuple[str, int, int, int, int]]: ...

    def ledger(self) -> list[LedgerEntry]: ...

    def close(self) -> None: ...


def postgres_url(store: StoreConfig) -> str | None:
    return store.postgres_url or (
        os.environ[store.postgres_url_env] if store.postgres_url_env else None
    )


def redis_url(store: StoreConfig) -> str | None:
    return store.redis_url or (os.environ[store.redis_url_env] if store.redis_url_env else None)


def open_state(store: StoreConfig, state_dir: Path) -> StateStore:
    """The state database: PostgreSQL when configured, else SQLite in `state_dir`."""
    url = postgres_url(store)
    if url is not None:
        from grifo.store.postgres import PostgresDB  # only replicas need the driver

        return PostgresDB(url, store.postgres_schema)
    from grifo.store.sqlite import StateDB

    state_dir.mkdir(parents=True, exist_ok=True)
    return StateDB(state_dir / "grifo.db")
