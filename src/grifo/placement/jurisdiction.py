"""What a request may use: the tenant's jurisdictions, narrowed (never widened) by the request,
and the tier (edge, regional, central) it asks for."""

from __future__ import annotations

from collections.abc import Mapping

from grifo.errors import InvalidRequestError, PermissionDeniedError
from grifo.jurisdictions import UnknownJurisdictionError, expand
from grifo.security.keys import Principal

HEADER = b"x-grifo-allowed-jurisdictions"
DATA_CLASS_HEADER = b"x-grifo-data-class"
TIER_HEADER = b"x-grifo-tier"
TIERS = frozenset({"edge", "regional", "central"})


def allowed_set(
    tenant_allowed: frozenset[str] | None,
    requested: bytes | None,
    blocs: Mapping[str, frozenset[str]],
) -> frozenset[str] | None:
    """Countries this request may be processed in; None means unrestricted.

    The header `x-grifo-allowed-jurisdictions: DE,FR` (countries or blocs) can only remove
    countries from the tenant's set; naming only countries outside it is refused with 403.
    """
    if requested is None:
        return tenant_allowed
    codes = [c for c in requested.decode("latin-1").split(",") if c.strip()]
    if not codes:
        raise InvalidRequestError(
            "x-grifo-allowed-jurisdictions is empty", param="x-grifo-allowed-jurisdictions"
        )
    try:
        narrowed = expand(codes, blocs)
    except UnknownJurisdictionError as exc:
        raise InvalidRequestError(str(exc), param="x-grifo-allowed-jurisdictions") from None
    if tenant_allowed is None:
        return narrowed
    result = narrowed & tenant_allowed
    if not result:
        raise PermissionDeniedError(
            "none of the jurisdictions in x-grifo-allowed-jurisdictions is allowed for this "
            "tenant; a request can narrow its tenant's jurisdictions, never widen them",
            code="jurisdiction_not_allowed",
        )
    return result


def data_class_policy(
    principal: Principal, header: bytes | None
) -> tuple[str, frozenset[str] | None]:
    """(data class, the tenant's jurisdictions for it) for a request. A class the tenant does
    not define is refused: a misspelt `health` must never fall back to a wider set."""
    if header is None:
        name = principal.default_class
    else:
        name = header.decode("latin-1").strip().lower()
        if principal.classes is None or name not in principal.classes:
            known = ", ".join(sorted(principal.classes or {})) or "none"
            raise InvalidRequestError(
                f"unknown data class {name!r} for this tenant (it defines: {known})",
                param="x-grifo-data-class",
            )
    if name and principal.classes is not None and name in principal.classes:
        return name, principal.classes[name]
    return name, principal.allowed


def requested_tier(tenant_tier: str | None, header: bytes | None) -> str | None:
    """The tier a request must run in (None: any). Tiers trade latency for price, not law, so
    a request may pick any tier, overriding its tenant's default."""
    if header is None:
        return tenant_tier
    tier = header.decode("latin-1").strip().lower()
    if tier == "any":
        return None
    if tier not in TIERS:
        raise InvalidRequestError(
            "x-grifo-tier must be edge, regional, central or any", param="x-grifo-tier"
        )
    return tier
