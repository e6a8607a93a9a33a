"""`/admin/...`: usage, budgets, keys and points, for keys with an admin role; keys can be
made and revoked too (`admin_keys.py`), and tenants managed (`admin_tenants.py`).

`admin` sees every tenant; `tenant-admin` and `auditor` see their own tenant only, and another
tenant's objects do not exist for them (404, the same as a tenant nobody has); `user` keys get
403. Reads run in a worker thread, so a slow or unreachable database never stalls inference.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from grifo.admission.burn import burn_rates
from grifo.api import admin_keys
from grifo.api.admin_tenants import PREFIX as TENANTS_PREFIX
from grifo.api.admin_tenants import TenantsApi
from grifo.config.model import BudgetConfig
from grifo.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
)
from grifo.http.message import Request, Response
from grifo.security.keys import KeyRing, Principal
from grifo.security.tenants import Directory
from grifo.store.records import TOTAL_COLUMNS
from grifo.store.select import StateStore

ROUTES = frozenset(
    {
        "/admin/usage",
        "/admin/budgets",
        "/admin/keys",
        "/admin/points",
        "/admin/dashboard",
        "/admin/tenants",
    }
)
PREFIXES = ("/admin/keys/", TENANTS_PREFIX)


class AdminApi:
    def __init__(
        self,
        keys: KeyRing,
        db: StateStore,
        budgets: Callable[[], Mapping[str, BudgetConfig]],
        directory: Directory,
        points: Callable[[], list[dict[str, Any]]] = list,
        dashboard: Callable[[Principal], dict[str, Any]] | None = None,
        budgets_possible: Callable[[], bool] = lambda: True,
    ) -> None:
        self._keys = keys
        self._db = db
        self._budgets = budgets
        self._directory = directory
        self._points = points
        self._dashboard = dashboard
        self._tenants = TenantsApi(db, directory, budgets_possible)

    async def handle(self, request: Request) -> Response:
        principal = self._keys.authenticate(request.headers.get(b"authorization"))
        if principal.role == "user":
            raise PermissionDeniedError("this key may not use the admin API (role: user)")
        if request.path.startswith("/admin/keys/"):
            if request.method != "DELETE":
                raise MethodNotAllowedError(f"{request.path} accepts DELETE only")
            return await admin_keys.revoke(self._db, principal, request.path[len("/admin/keys/") :])
        if request.path == "/admin/keys" and request.method == "POST":
            return await admin_keys.create(self._db, self._directory, principal, request.body)
        if request.path == "/admin/tenants" or request.path.startswith(TENANTS_PREFIX):
            return await self._tenants.handle(principal, request.method, request.path, request.body)
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(f"{request.path} accepts GET only")
        query = _query(request.query)
        if request.path == "/admin/usage":
            return _json(await self._usage(principal, query))
        if request.path == "/admin/budgets":
            return _json(await self._burn(principal, query))
        if request.path == "/admin/dashboard" and self._dashboard is not None:
            return _json(self._dashboard(principal))  # filtered to what the key may see
        if request.path == "/admin/points":
            # The fabric's shape and health: every admin role may see it (no tenant's data).
            return _json({"object": "list", "data": self._points()})
        return _json(await self._list_keys(principal, query))

    async def _usage(self, principal: Principal, query: Mapping[str, str]) -> dict[str, Any]:
        by = _choice(query, "by", tuple(TOTAL_COLUMNS), "tenant")
        period = _choice(query, "period", ("day", "month", "all"), "month")
        tenant = _tenant(principal, query)
        now = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        start = {"day": now, "month": now.replace(day=1), "all": None}[period]
        since_ms = int(start.timestamp() * 1000) if start else 0
        rows = await asyncio.to_thread(lambda: self._db.totals(by, since_ms, tenant))
        data = [
            {
                by: group,
                "requests": n,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost_micros": cost,
            }
            for group, n, prompt, completion, cost in rows
        ]
        return {"object": "list", "by": by, "period": period, "data": data}

    async def _burn(self, principal: Principal, query: Mapping[str, str]) -> dict[str, Any]:
        tenant = _tenant(principal, query)
        budgets = {
            name: budget
            for name, budget in self._budgets().items()
            if principal.sees(name) and tenant in (None, name)
        }
        burns = await asyncio.to_thread(
            lambda: burn_rates(self._db, budgets, dt.datetime.now(dt.UTC))
        )
        data = [
            {
                "tenant": b.tenant,
                "limit_micros": b.limit_micros,
                "spent_micros": b.spent_micros,
                "rate_micros_per_hour": b.rate_micros_per_hour,
                "projected_micros": b.projected_micros,
                "runs_out_at": b.runs_out_at.isoformat() if b.runs_out_at else None,
            }
            for b in burns
        ]
        return {"object": "list", "data": data}

    async def _list_keys(self, principal: Principal, query: Mapping[str, str]) -> dict[str, Any]:
        tenant = _tenant(principal, query)
        rows = await asyncio.to_thread(self._db.list_keys)
        data = [
            {"id": key_id, "tenant": owner, "created_ms": created, "revoked_ms": revoked}
            for key_id, owner, created, revoked in rows
            if principal.sees(owner) and tenant in (None, owner)
        ]
        return {"object": "list", "data": data}


def _tenant(principal: Principal, query: Mapping[str, str]) -> str | None:
    """The tenant a read is about: `?tenant=`, else the caller's own unless it is an admin."""
    tenant = query.get("tenant")
    if tenant is None:
        return None if principal.role == "admin" else principal.tenant
    if not principal.sees(tenant):
        raise NotFoundError(f"no tenant {tenant!r}")
    return tenant


def _query(raw: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(raw, strict_parsing=bool(raw), max_num_fields=16)
    except ValueError:
        raise InvalidRequestError("malformed query string") from None
    query = dict(pairs)
    if len(query) != len(pairs):
        raise InvalidRequestError("a query parameter is given twice")
    unknown = set(query) - {"by", "period", "tenant"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequestError(f"unknown query parameter {name!r}", param=name)
    return query


def _choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = query.get(name, default)
    if value not in allowed:
        raise InvalidRequestError(f"{name} must be one of {', '.join(allowed)}", param=name)
    return value


def _json(payload: dict[str, Any]) -> Response:
    return Response(200, msgspec.json.encode(payload))
