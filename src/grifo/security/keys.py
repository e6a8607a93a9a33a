"""API keys: generated at random, stored only as SHA-256, looked up by hash.

A key is `grf-<8 hex>-<secret>`. Lookup hashes the presented key and finds the digest in a dict:
nothing ever compares secret bytes, so timing reveals nothing about stored keys.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from grifo.errors import AuthenticationError
from grifo.guardrails.policy import Guardrails

_MAX_KEY_LEN = 256
NO_GUARDRAILS = Guardrails()

Role = Literal["user", "tenant-admin", "auditor", "admin"]
"""user: inference only; tenant-admin: inference and its tenant's usage, budgets and keys;
auditor: read its tenant's usage and budgets, no inference; admin: read every tenant's."""
ROLES: tuple[Role, ...] = ("user", "tenant-admin", "auditor", "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant, through one of its keys, with the jurisdictions it may use."""

    tenant: str
    key_id: str
    allowed: frozenset[str] | None  # None: unrestricted
    tier: str | None = None  # None: any tier
    timeout_s: float | None = None  # the tenant's default deadline, if any
    role: Role = "user"
    classes: Mapping[str, frozenset[str] | None] | None = None  # jurisdictions per data class
    default_class: str = ""
    models: frozenset[str] | None = None  # the key's model allow-list (None: any)
    expires_ms: int | None = None
    redacted_to: Mapping[str, frozenset[str]] | None = None  # per class, once redacted
    priority: int = 1  # the tenant's: 0 low, 1 normal, 2 high (the most a request may ask)
    guardrails: Guardrails = NO_GUARDRAILS  # the tenant's

    def sees(self, tenant: str) -> bool:
        """Whether this principal may read `tenant`'s usage, budgets and keys."""
        return self.role == "admin" or (self.role != "user" and tenant == self.tenant)


def generate_key() -> str:
    return f"grf-{secrets.token_hex(4)}-{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class TokenSource(Protocol):
    def principal(self, token: bytes) -> Principal: ...


_MAX_SEEN = 4096  # Authorization headers remembered; past that, new ones are hashed each time


class KeyRing:
    def __init__(self) -> None:
        self._by_digest: dict[bytes, Principal] = {}
        # Authorization headers already checked, to their principal: no hashing on the next
        # request with the same key. Emptied whenever the keys change.
        self._seen: dict[bytes, Principal] = {}
        self.tokens: TokenSource | None = None  # OIDC/JWT bearer tokens, when configured

    def add(self, sha256_hex: str, principal: Principal) -> None:
        self._by_digest[bytes.fromhex(sha256_hex)] = principal
        self._seen = {}

    def replace(self, other: KeyRing) -> None:
        """Take `other`'s keys, all at once (a refresh from the shared store)."""
        self._by_digest = dict(other._by_digest)
        self._seen = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def peek(self, authorization: bytes | None) -> Principal:
        """The caller as far as it can be told, for the record of a refused request: its
        principal, or an anonymous one."""
        try:
            return self.authenticate(authorization)
        except AuthenticationError:
            return Principal("", "", frozenset())

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal for an `Authorization: Bearer <key>` header, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>'")
        principal = self._seen.get(authorization)
        if principal is not None:
            if principal.expires_ms is not None and time.time() * 1000 >= principal.expires_ms:
                raise AuthenticationError("this API key has expired", code="expired_api_key")
            return principal
        scheme, _, key = authorization.partition(b" ")
        key = key.strip()
        if self.tokens is not None and key.startswith(b"eyJ") and scheme.lower() == b"bearer":
            return self.tokens.principal(key)  # a JWT: its header is base64url of '{"'
        if scheme.lower() != b"bearer" or not key or len(key) > _MAX_KEY_LEN:
            raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(key).digest()
        principal = self._by_digest.get(digest)
        if principal is None:
            raise AuthenticationError("invalid API key")
        if principal.expires_ms is not None and time.time() * 1000 >= principal.expires_ms:
            raise AuthenticationError("this API key has expired", code="expired_api_key")
        if len(self._seen) < _MAX_SEEN:
            self._seen[authorization] = principal
        return principal
