"""The schema of `gateway.registry`: join tokens, and how often registered points heartbeat.

A join token lets a point register itself, but only as what the token's scope allows: the
jurisdictions it may claim, its tiers and a pattern its name must match. A point's jurisdiction
is what makes placement lawful, so the scope is the operator's word, never the point's.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Unknown fields are errors (as in config/model.py)."""


class JoinTokenConfig(_Base, kw_only=True, frozen=True):
    """One join token: given to the operators of some points (`grifo join-token` makes one)."""

    id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")] | None = None
    env: str | None = None
    """A variable holding the token itself (instead of its `sha256`)."""
    jurisdictions: list[str]
    """Countries and blocs (`EU`, `MERCOSUR`, ...) a point holding this token may claim."""
    tiers: list[Literal["edge", "regional", "central"]] = msgspec.field(
        default_factory=lambda: ["edge", "regional", "central"]
    )
    name_pattern: str = ".*"
    """A regular expression the whole point name must match, e.g. `lima-.*`."""


class RegistryConfig(_Base, kw_only=True, frozen=True):
    """Points that join and leave at run time (see README, Points join and leave)."""

    tokens: list[JoinTokenConfig] = []
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 2.0
    """How often points heartbeat, and how often each gateway process reads the registry."""
    expire_after_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    """A registration without a heartbeat for this long gets no traffic and is dropped."""
