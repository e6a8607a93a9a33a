"""OIDC/JWT bearer tokens, verified against a JWKS file (PyJWT), mapped to a tenant and a role.

A token is accepted when its signature verifies with the JWKS key its header names (`kid`),
with one of the configured algorithms (never `none`, never an HMAC secret made of a public key),
and its `iss`, `aud`, `exp` and `nbf` hold. Its tenant claim must name a configured tenant and
its role claim one of grifo's roles (default `user`): the identity provider grants roles, the
caller cannot. The principal is the tenant's, as for its API keys, with key id `jwt:<sub>`;
verified tokens are cached until they expire. The JWKS file is read at start: no network fetch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import jwt

from grifo.config.model import JwtConfig
from grifo.errors import AuthenticationError
from grifo.security.keys import ROLES, Principal
from grifo.store.records import StoredKey

MAX_TOKEN_BYTES = 8192
_CACHE = 10_000


class TokenVerifier:
    def __init__(
        self, config: JwtConfig, principal: Callable[[StoredKey], Principal], tenants: set[str]
    ) -> None:
        self._config = config
        self._principal = principal
        self._tenants = tenants
        self._keys = {
            key.key_id: key
            for key in jwt.PyJWKSet.from_json(Path(config.jwks_file).read_text()).keys
        }
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()

    def principal(self, token: bytes) -> Principal:
        """The principal a valid token stands for, or AuthenticationError."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError("invalid token: too long", code="invalid_token")
        cached = self._cache.get(token)
        if cached is not None and cached.expires_ms is not None:
            if time.time() * 1000 < cached.expires_ms:
                return cached
            del self._cache[token]
        principal = self._verify(token)
        self._cache[token] = principal
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: bytes) -> Principal:
        config = self._config
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthenticationError(
                    "invalid token: unknown signing key", code="invalid_token"
                )
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=list(config.algorithms),
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_s,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the token has expired", code="expired_token") from None
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(f"invalid token: {exc}", code="invalid_token") from None
        tenant = claims.get(config.tenant_claim)
        if not isinstance(tenant, str) or tenant not in self._tenants:
            raise AuthenticationError(
                f"invalid token: its {config.tenant_claim!r} claim names no tenant here",
                code="invalid_token",
            )
        role = claims.get(config.role_claim, "user")
        if role not in ROLES:
            raise AuthenticationError(
                f"invalid token: {config.role_claim!r} must be one of {', '.join(ROLES)}",
                code="invalid_token",
            )
        stored = StoredKey(f"jwt:{claims['sub']}", tenant, "", role, int(claims["exp"]) * 1000)
        return self._principal(stored)
