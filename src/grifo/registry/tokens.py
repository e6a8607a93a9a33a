"""Join tokens: who may register a point, and as what.

A token is `gjt-<8 hex>-<secret>`; the gateway keeps only its SHA-256 (from the config, or
hashed at start from a variable) and compares the digest of a presented token with every
configured digest in constant time. A token's scope bounds what a point holding it may claim:
the jurisdictions (countries and blocs, expanded), the tiers and a pattern its name must match.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from grifo.config.model import PointConfig
from grifo.config.registry import RegistryConfig
from grifo.errors import AuthenticationError
from grifo.jurisdictions import expand

_MAX_TOKEN_LEN = 256


def generate_join_token() -> str:
    return f"gjt-{secrets.token_hex(4)}-{secrets.token_urlsafe(32)}"


@dataclass(frozen=True, slots=True)
class JoinToken:
    id: str
    digest: bytes
    jurisdictions: frozenset[str]
    tiers: frozenset[str]
    name_pattern: re.Pattern[str]

    def refusal(self, point: PointConfig) -> tuple[str, str] | None:
        """(field, why) when this token may not register `point`; None when it may."""
        if point.jurisdiction not in self.jurisdictions:
            allowed = ", ".join(sorted(self.jurisdictions)) or "none"
            return "jurisdiction", (
                f"this join token may not register points in {point.jurisdiction} "
                f"(its jurisdictions: {allowed})"
            )
        if point.tier not in self.tiers:
            return "tier", f"this join token may not register {point.tier} points"
        if self.name_pattern.fullmatch(point.name) is None:
            return "name", f"this join token may not register a point named {point.name!r}"
        return None


class JoinTokens:
    def __init__(self, tokens: list[JoinToken]) -> None:
        self._tokens = tokens
        self._by_id = {t.id: t for t in tokens}

    @classmethod
    def from_config(
        cls, registry: RegistryConfig, blocs: Mapping[str, frozenset[str]]
    ) -> JoinTokens:
        tokens = []
        for t in registry.tokens:
            if t.sha256 is not None:
                digest = bytes.fromhex(t.sha256)
            else:
                assert t.env is not None  # checked with the config
                digest = hashlib.sha256(os.environ[t.env].encode("utf-8")).digest()
            tokens.append(
                JoinToken(
                    t.id,
                    digest,
                    expand(t.jurisdictions, blocs),
                    frozenset(t.tiers),
                    re.compile(t.name_pattern),
                )
            )
        return cls(tokens)

    def get(self, token_id: str) -> JoinToken | None:
        return self._by_id.get(token_id)

    def authenticate(self, authorization: bytes | None) -> JoinToken:
        """The token an `Authorization: Bearer <join token>` header presents, or 401."""
        scheme, _, presented = (authorization or b"").partition(b" ")
        presented = presented.strip()
        if scheme.lower() != b"bearer" or not presented or len(presented) > _MAX_TOKEN_LEN:
            raise AuthenticationError(
                "send the join token as 'Authorization: Bearer <token>'", code="invalid_join_token"
            )
        digest = hashlib.sha256(presented).digest()
        found = None
        for token in self._tokens:  # every one, whatever matched: no early exit to time
            if hmac.compare_digest(digest, token.digest):
                found = token
        if found is None:
            raise AuthenticationError("invalid join token", code="invalid_join_token")
        return found
