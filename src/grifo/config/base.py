"""What every section of the configuration schema shares: strictness, and the kinds of value
that recur (names, prices, tiers)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Usd = Annotated[float, msgspec.Meta(ge=0, le=1_000_000)]
Tier = Literal["edge", "regional", "central"]


class Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Unknown fields are errors: a typo must not silently change behaviour."""
