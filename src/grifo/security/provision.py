"""The key ring a gateway serves with: keys from the config and from the state database
(`grifo keys`), demo keys for the demo, and the refresh that picks up changes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from grifo.admission.shedding import PRIORITIES
from grifo.config.model import GrifoConfig, KeyConfig, TenantConfig
from grifo.errors import StoreUnavailableError
from grifo.guardrails.policy import Guardrails
from grifo.jurisdictions import expand, merge_blocs
from grifo.security.keys import ROLES, KeyRing, Principal, Role, generate_key, hash_key
from grifo.security.tenants import Directory
from grifo.store.records import StoredKey
from grifo.store.select import StateStore

KEY_REFRESH_S = 2.0


def build_keyring(
    config: GrifoConfig,
    db: StateStore,
    state_dir: Path,
    *,
    create_demo: bool = True,
    tenants: Sequence[TenantConfig] | None = None,
) -> tuple[KeyRing, dict[str, str]]:
    """Keys from the config and the state database, for `tenants` (default: the config's);
    demo keys are created once and kept."""
    blocs = merge_blocs(config.blocs)
    if tenants is None:
        tenants = config.tenants
    allowed = {
        t.name: None if t.allowed_jurisdictions is None else expand(t.allowed_jurisdictions, blocs)
        for t in tenants
    }
    tiers = {t.name: None if t.tier == "any" else t.tier for t in tenants}
    timeouts = {t.name: t.timeout_ms / 1000 if t.timeout_ms else None for t in tenants}

    classes = {
        t.name: {c: None if j is None else expand(j, blocs) for c, j in t.data_classes.items()}
        for t in tenants
    }
    defaults = {t.name: t.default_data_class or "" for t in tenants}
    priorities = {t.name: PRIORITIES[t.priority] for t in tenants}
    rails = {
        t.name: Guardrails(
            t.guardrails.pii,
            t.guardrails.injection,
            t.guardrails.injection_threshold,
            t.guardrails.tool_injection,
        )
        for t in tenants
    }
    redacted = {t.name: {c: expand(j, blocs) for c, j in t.redacted_to.items()} for t in tenants}

    def principal(key: StoredKey) -> Principal:
        tenant, key_id = key.tenant, key.id
        known: Role = next((r for r in ROLES if r == key.role), "user")  # never more than stored
        return Principal(
            tenant,
            key_id,
            allowed[tenant],
            tiers[tenant],
            timeouts[tenant],
            known,
            classes[tenant] or None,
            defaults[tenant],
            frozenset(key.models.split(",")) if key.models else None,
            key.expires_ms,
            redacted[tenant] or None,
            priorities.get(tenant, 1),
            rails.get(tenant, Guardrails()),
        )

    ring = KeyRing()
    if config.gateway.jwt is not None:
        from grifo.security.tokens import TokenVerifier

        ring.tokens = TokenVerifier(config.gateway.jwt, principal, set(allowed))
    for key in config.keys:
        digest = key.sha256 or hash_key(os.environ[key.env or ""])
        ring.add(digest, principal(stored_key(key, digest)))
    demo: dict[str, str] = {}
    if config.gateway.demo_keys and create_demo:
        demo = _demo_keys(config, db, state_dir)
    for stored in db.active_keys():
        if stored.tenant in allowed:
            ring.add(stored.sha256, principal(stored))
    return ring, demo


def stored_key(key: KeyConfig, digest: str) -> StoredKey:
    """A key from the config as the state database would hold it."""
    expires = None
    if key.expires is not None:
        when = dt.datetime.fromisoformat(key.expires)
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        expires = int(when.timestamp() * 1000)
    return StoredKey(key.id, key.tenant, digest, key.role, expires, ",".join(key.models or []))


async def refresh_keys(
    config: GrifoConfig,
    db: StateStore,
    state_dir: Path,
    ring: KeyRing,
    interval_s: float,
    directory: Directory | None = None,
    on_tenants: Callable[[list[TenantConfig]], None] | None = None,
) -> None:
    """Re-read keys (and tenants made over the admin API: one query more) from the state
    database, so keys and tenants created or removed by any gateway process take effect within
    `interval_s`; `on_tenants` gets the effective tenants when they change. While the database
    is unreachable the keys and tenants last read stay in force."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            fresh, changed = await asyncio.to_thread(reload, config, db, state_dir, directory)
        except StoreUnavailableError:
            continue
        ring.replace(fresh)
        if changed and directory is not None and on_tenants is not None:
            on_tenants(directory.tenants())


def reload(
    config: GrifoConfig, db: StateStore, state_dir: Path, directory: Directory | None
) -> tuple[KeyRing, bool]:
    """The key ring from the state database now, and whether the stored tenants changed."""
    changed = False
    tenants = None
    if directory is not None:
        changed = directory.update(db.stored_tenants())
        tenants = directory.tenants()
    ring, _ = build_keyring(config, db, state_dir, create_demo=False, tenants=tenants)
    return ring, changed


def _demo_keys(config: GrifoConfig, db: StateStore, state_dir: Path) -> dict[str, str]:
    path = state_dir / "demo-keys.json"
    known: dict[str, str] = {}
    if path.exists():
        known = json.loads(path.read_text(encoding="utf-8"))
    active = {key.tenant for key in db.active_keys()}
    keys: dict[str, str] = {}
    for tenant in config.tenants:
        key = known.get(tenant.name)
        if key is None or tenant.name not in active:
            db.revoke_keys(tenant.name)
            key = generate_key()
            db.add_key(StoredKey(f"demo-{tenant.name}-{key[4:12]}", tenant.name, hash_key(key)))
        keys[tenant.name] = key
    path.write_text(json.dumps(keys, indent=2) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return keys
