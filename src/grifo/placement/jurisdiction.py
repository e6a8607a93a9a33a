"""What a request may use: the tenant's jurisdictions, narrowed (never widened) by the request,
and the tier (edge, regional, central) it asks for."""

from __future__ import annotations

from collections.abc import Mapping

from grifo.errors import InvalidRequestError, PermissionDeniedError, caused_by
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
        error = InvalidRequestError(str(exc), param="x-grifo-allowed-jurisdictions")
        raise caused_by(error, None)  # noqa: B904 (see caused_by)
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


def redacted_only(
    principal: Principal, data_class: str, allowed: frozenset[str] | None
) -> frozenset[str]:
    """Jurisdictions this class may reach only once personal data is redacted."""
    if allowed is None or principal.redacted_to is None:
        return frozenset()
    return principal.redacted_to.get(data_class, frozenset()) - allowed


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


def request_policy(
    principal: Principal, headers: Mapping[bytes, bytes], blocs: Mapping[str, frozenset[str]]
) -> tuple[str, frozenset[str] | None, frozenset[str]]:
    """(data class, where the request may run, the part of that only for redacted text): the
    tenant's set for the class, widened by its redacted-only jurisdictions, then narrowed by
    the request's own header."""
    data_class, tenant_allowed = data_class_policy(principal, headers.get(DATA_CLASS_HEADER))
    only_redacted = redacted_only(principal, data_class, tenant_allowed)
    if only_redacted and tenant_allowed is not None:
        tenant_allowed = tenant_allowed | only_redacted
    return data_class, allowed_set(tenant_allowed, headers.get(HEADER), blocs), only_redacted


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
