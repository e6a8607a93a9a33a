"""`GET /admin/tenants`, `PUT` and `DELETE /admin/tenants/<name>`: tenants managed over the API.

Only an admin may make, replace or delete a tenant; tenant admins and auditors see their own
tenant only, and users nothing (403, like the rest of the admin API). Config tenants are read
only here (409 `tenant_in_config`). A body is the `TenantConfig` fields without `name`,
validated like the config file's, and a bad one is a 400 naming the field. Deleting a tenant
revokes its stored keys. Every gateway process picks changes up within the key refresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from grifo.config.model import TenantConfig
from grifo.errors import (
    ConflictError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
)
from grifo.http.message import Response
from grifo.security.keys import Principal
from grifo.security.tenants import Directory, TenantError
from grifo.store.select import StateStore

log = logging.getLogger("grifo.admin")
PREFIX = "/admin/tenants/"


class TenantsApi:
    def __init__(
        self, db: StateStore, directory: Directory, budgets_possible: Callable[[], bool]
    ) -> None:
        self._db = db
        self._directory = directory
        self._budgets_possible = budgets_possible

    async def handle(self, principal: Principal, method: str, path: str, body: bytes) -> Response:
        if path == "/admin/tenants":
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowedError(f"{path} accepts GET only")
            return await self._list(principal)
        name = path[len(PREFIX) :]
        if method not in ("PUT", "DELETE"):
            raise MethodNotAllowedError(f"{path} accepts PUT and DELETE only")
        if principal.role != "admin":
            raise PermissionDeniedError(f"a {principal.role} key may not change tenants")
        if name in self._directory.config_names:
            raise ConflictError(
                f"tenant {name!r} is in the config file; change it there",
                code="tenant_in_config",
            )
        if method == "PUT":
            return await self._put(principal, name, body)
        return await self._delete(principal, name)

    async def _list(self, principal: Principal) -> Response:
        rows = await asyncio.to_thread(self._db.stored_tenants)
        stored = self._directory.valid(rows)
        data = [_shown(t, "config") for t in self._directory.config_tenants]
        data += [_shown(t, "api") for t in stored.values()]
        data = [row for row in data if principal.sees(row["name"])]
        return Response(200, msgspec.json.encode({"object": "list", "data": data}))

    async def _put(self, principal: Principal, name: str, body: bytes) -> Response:
        try:
            tenant = self._directory.decode(name, body)
        except TenantError as exc:
            raise InvalidRequestError(f"invalid tenant: {exc}", param=exc.field) from None
        if tenant.budget is not None and not self._budgets_possible():
            raise InvalidRequestError(
                "budgets on a shared PostgreSQL need `store.redis_url` for their reservations",
                param="budget",
            )
        text = msgspec.json.encode(tenant).decode()
        created = await asyncio.to_thread(self._db.put_tenant, name, text)
        log.info("tenant %s %s by %s", name, "made" if created else "replaced", principal.key_id)
        return Response(201 if created else 200, msgspec.json.encode(_shown(tenant, "api")))

    async def _delete(self, principal: Principal, name: str) -> Response:
        if not await asyncio.to_thread(self._db.delete_tenant, name):
            raise NotFoundError(f"no tenant {name!r}")
        await asyncio.to_thread(self._db.revoke_keys, name)
        log.info("tenant %s deleted, its keys revoked, by %s", name, principal.key_id)
        return Response(200, msgspec.json.encode({"name": name, "deleted": True}))


def _shown(tenant: TenantConfig, source: str) -> dict[str, Any]:
    shown: dict[str, Any] = msgspec.to_builtins(tenant)
    shown["source"] = source
    return shown
