"""Tenants made over the admin API (`PUT /admin/tenants/<name>`), kept in the state database.

The effective tenants are the config's, then the stored ones. A stored tenant is validated
exactly like a config tenant (`config/load.py`); one whose name a config tenant has, or that no
longer validates (a bloc removed from the config, say), is ignored and logged once.
"""

from __future__ import annotations

import logging
import re

import msgspec

from grifo.config.load import ConfigError, tenant_problems
from grifo.config.model import BudgetConfig, GrifoConfig, TenantConfig
from grifo.jurisdictions import merge_blocs
from grifo.store.select import StateStore

log = logging.getLogger("grifo.tenants")
_AT = re.compile(r"`\$\.([^`]+)`|^\$\.([A-Za-z0-9_.\[\]-]+)")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


class TenantError(ConfigError):
    """A tenant given over the API is invalid; `field` is the offending one, when known."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        at, unknown = _AT.search(message), _UNKNOWN.search(message)
        parts = [at.group(1) or at.group(2)] if at is not None else []
        parts += [unknown.group(1)] if unknown is not None else []
        self.field = ".".join(parts) or None


class Directory:
    """The effective tenants of a gateway process; `update` takes the stored rows (the key
    refresh reads them) and says whether anything changed."""

    def __init__(self, config: GrifoConfig, db: StateStore) -> None:
        self._db = db
        self._blocs = merge_blocs(config.blocs)
        self.config_tenants = list(config.tenants)
        self.config_names = frozenset(t.name for t in config.tenants)
        self.stored: dict[str, TenantConfig] = {}
        self._decoded: dict[tuple[str, str], TenantConfig | None] = {}
        self._warned: set[tuple[str, str]] = set()

    def decode(self, name: str, body: bytes | str) -> TenantConfig:
        """A tenant from a JSON object of `TenantConfig` fields (`name` comes from the path);
        raises `TenantError` naming the field."""
        try:
            data = msgspec.json.decode(body or b"{}")
        except msgspec.DecodeError:
            raise TenantError("the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise TenantError("the body must be a JSON object")
        if data.get("name", name) != name:
            raise TenantError("`$.name`: the tenant's name is the one in the path")
        try:
            tenant = msgspec.convert({**data, "name": name}, TenantConfig)
        except msgspec.ValidationError as exc:
            raise TenantError(str(exc)) from None
        problems = tenant_problems("$", tenant, self._blocs)
        if problems:
            raise TenantError("; ".join(problems))
        return tenant

    def tenants(self) -> list[TenantConfig]:
        return self.config_tenants + list(self.stored.values())

    def budgets(self) -> dict[str, BudgetConfig]:
        return {t.name: t.budget for t in self.tenants() if t.budget is not None}

    def valid(self, rows: list[tuple[str, str]]) -> dict[str, TenantConfig]:
        """The stored rows that count: valid, and not named like a config tenant."""
        found: dict[str, TenantConfig] = {}
        for name, text in rows:
            if name in self.config_names:
                self._warn(name, text, "a config tenant has that name; the stored one is ignored")
                continue
            try:
                tenant = self._decoded[name, text]
            except KeyError:  # not seen yet (the refresh and admin reads share the cache)
                if len(self._decoded) > 10_000:
                    self._decoded.clear()
                try:
                    tenant = self.decode(name, text)
                except TenantError as exc:
                    tenant = None
                    self._warn(name, text, f"it is invalid ({exc}); it is ignored")
                self._decoded[name, text] = tenant
            if tenant is not None:
                found[name] = tenant
        return found

    def update(self, rows: list[tuple[str, str]]) -> bool:
        """Take the stored rows as the current stored tenants; True if they changed."""
        fresh = self.valid(rows)
        changed = fresh != self.stored
        self.stored = fresh
        return changed

    def knows(self, name: str) -> bool:
        """Whether `name` is a tenant now (asks the database: it may be newer than `stored`)."""
        return name in self.config_names or name in self.valid(self._db.stored_tenants())

    def _warn(self, name: str, text: str, why: str) -> None:
        if (name, text) not in self._warned:
            self._warned.add((name, text))
            log.warning("stored tenant %r: %s", name, why)
