"""A request's allowed jurisdictions: the tenant's set, narrowed (never widened) by the request."""

from __future__ import annotations

from collections.abc import Mapping

from grifo.errors import InvalidRequestError, PermissionDeniedError
from grifo.jurisdictions import UnknownJurisdictionError, expand

HEADER = b"x-grifo-allowed-jurisdictions"


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
