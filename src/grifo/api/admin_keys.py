"""`POST /admin/keys` and `DELETE /admin/keys/<id>`: API keys made and revoked over the API.

An admin may make a key of any role for any tenant (the config's or one made over the API); a
tenant admin only `user` and `auditor` keys of its own tenant (no one grants a role above their
own); auditors and users may not. A new key is in the answer once and only its hash is stored.
Revoking needs the same standing over the key's tenant; another tenant's key does not exist for
the caller (404).
Every gateway process, replicas included, picks changes up within seconds (the key refresh).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import msgspec

from grifo.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from grifo.http.message import Response
from grifo.security.keys import Principal, Role, generate_key, hash_key
from grifo.security.tenants import Directory
from grifo.store.records import StoredKey
from grifo.store.select import StateStore

log = logging.getLogger("grifo.admin")
_GRANTS: dict[str, tuple[Role, ...]] = {
    "admin": ("user", "tenant-admin", "auditor", "admin"),
    "tenant-admin": ("user", "auditor"),
}


class NewKey(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tenant: str | None = None
    role: Role = "user"
    models: list[str] | None = None
    expires_days: Annotated[float, msgspec.Meta(gt=0, le=3650)] | None = None


async def create(db: StateStore, tenants: Directory, principal: Principal, body: bytes) -> Response:
    try:
        ask = msgspec.json.decode(body or b"{}", type=NewKey)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid key request: {exc}") from None
    except msgspec.DecodeError:
        raise InvalidRequestError("the body must be a JSON object") from None
    tenant = ask.tenant or principal.tenant
    if not principal.sees(tenant) or not await asyncio.to_thread(tenants.knows, tenant):
        raise NotFoundError(f"no tenant {tenant!r}")
    if ask.role not in _GRANTS.get(principal.role, ()):
        raise PermissionDeniedError(
            f"a {principal.role} key may not make {ask.role} keys", code="role_not_grantable"
        )
    key = generate_key()
    key_id = f"key-{key[4:12]}"
    expires = None
    if ask.expires_days is not None:
        expires = int((time.time() + ask.expires_days * 86_400) * 1000)
    models = ",".join(m.strip() for m in ask.models or [] if m.strip())
    stored = StoredKey(key_id, tenant, hash_key(key), ask.role, expires, models)
    await asyncio.to_thread(db.add_key, stored)
    log.info("key %s (%s) made for %s by %s", key_id, ask.role, tenant, principal.key_id)
    answer = {
        "id": key_id,
        "tenant": tenant,
        "role": ask.role,
        "key": key,
        "expires_ms": expires,
        "models": models.split(",") if models else None,
    }
    return Response(201, msgspec.json.encode(answer))


async def revoke(db: StateStore, principal: Principal, key_id: str) -> Response:
    if principal.role not in _GRANTS:
        raise PermissionDeniedError(f"a {principal.role} key may not revoke keys")
    rows = await asyncio.to_thread(db.list_keys)
    owner = next(
        (tenant for kid, tenant, _, revoked in rows if kid == key_id and not revoked), None
    )
    if owner is None or not principal.sees(owner):
        raise NotFoundError(f"no active key {key_id!r}")
    await asyncio.to_thread(db.revoke_key, key_id)
    log.info("key %s of %s revoked by %s", key_id, owner, principal.key_id)
    return Response(200, msgspec.json.encode({"id": key_id, "revoked": True}))
