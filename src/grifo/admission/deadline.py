"""Deadlines: how long a request may take, from `x-grifo-timeout-ms` or the gateway default.

A client may ask for less time than the gateway allows, never more. The deadline bounds the wait
for the point's answer, the whole body or stream, the hardware time a budget must reserve, and
is passed to the point so it stops generating for nobody.
"""

from __future__ import annotations

from grifo.errors import InvalidRequestError

HEADER = b"x-grifo-timeout-ms"
POINT_HEADER = b"x-grifo-deadline-ms"


def timeout_s(header: bytes | None, default_s: float) -> float:
    """Seconds this request may take: the header's value, capped by the gateway's default."""
    if header is None:
        return default_s
    raw = header.decode("latin-1").strip()
    # ASCII digits only ('²' is a digit to str.isdigit); any length is a number of ms, and
    # more than 15 digits is more than the gateway allows anyway (no int() of 5,000 digits).
    digits = raw.lstrip("0")
    if not (raw.isascii() and raw.isdigit()) or not digits:
        raise InvalidRequestError(
            "x-grifo-timeout-ms must be a positive whole number of milliseconds",
            param="x-grifo-timeout-ms",
        )
    if len(digits) > 15:
        return default_s
    return min(int(digits) / 1000, default_s)
