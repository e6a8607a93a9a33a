"""The single error tree of grifo and its OpenAI-style envelope.

    GrifoError (500 internal_error)
    ├── ClientError (4xx: the caller can fix it)
    │   ├── InvalidRequestError 400      ├── AuthenticationError 401
    │   ├── PermissionDeniedError 403    ├── NotFoundError 404 / ModelNotFoundError 404
    │   ├── MethodNotAllowedError 405    ├── RequestTimeoutError 408
    │   ├── ConflictError 409            ├── UnprocessableError 422
    │   ├── PayloadTooLargeError 413     ├── HeadersTooLargeError 431
    │   └── BudgetExceededError 429
    └── UpstreamError (5xx: a point or the fabric failed)
        ├── NoCompliantPointError 503    ├── PointUnavailableError 503 (retryable)
        ├── PointProtocolError 502       └── PointTimeoutError 504
        └── DeadlineExceededError 504 (the request's own deadline, a PointTimeoutError)

Only `envelope()` turns an error into bytes; messages never carry secrets or stack traces.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import msgspec


class GrifoError(Exception):
    """Base of every error grifo answers with; unknown exceptions are reported as this (500)."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    retry_after_s: float | None = None  # sent as `retry-after` (whole seconds, at least 1)
    audited = False  # set once the audit log has a record of the request it ended

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]

    def envelope(self) -> bytes:
        """The OpenAI error object for this error, as JSON bytes."""
        return envelope(self.message, self.type, self.code, self.param)


E = TypeVar("E", bound=BaseException)


def caused_by(error: E, cause: BaseException | None) -> E:
    """`raise caused_by(error, exc)` is `raise error from exc` (and `caused_by(error, None)` is
    `from None`), also in the modules `make compiled` builds: mypyc ignores `from`, leaving
    `__cause__` unset (bench/README.md, "The request path compiled with mypyc")."""
    error.__cause__ = cause  # sets __suppress_context__ too, as `from` does
    return error


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class ClientError(GrifoError):
    """The request cannot be served as sent; retrying it unchanged fails again."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequestError(ClientError):
    """Malformed JSON, wrong types, out-of-range or unsupported parameters."""


class AuthenticationError(ClientError):
    """Missing, malformed or unknown API key."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ClientError):
    """The caller is known but may not do this (e.g. asks for a jurisdiction it is not allowed)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(ClientError):
    """No such route."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The requested model is served by no point this caller may use."""

    code = "model_not_found"


class MethodNotAllowedError(ClientError):
    """The route exists but not for this HTTP method."""

    status = 405
    code = "method_not_allowed"


class ConflictError(ClientError):
    """The request conflicts with one still in progress (same idempotency key)."""

    status = 409
    code = "conflict"


class UnprocessableError(ClientError):
    """The request is well-formed but cannot be honoured as sent (e.g. a reused idempotency
    key with a different body)."""

    status = 422
    code = "unprocessable"


class GuardrailError(ClientError):
    """The tenant's guardrails refuse the request's content (personal data, prompt injection);
    the code says which."""

    code = "guardrail_blocked"


class RequestTimeoutError(ClientError):
    """The client sent its request too slowly."""

    status = 408
    code = "request_timeout"


class BudgetExceededError(ClientError):
    """The tenant's or key's budget for the period cannot cover this request (OpenAI's 429)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class RateLimitedError(ClientError):
    """Too many requests or tokens per minute, or too many at once (OpenAI's 429); the
    response says when to retry (`retry-after`, seconds)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PayloadTooLargeError(ClientError):
    """The body is larger than the configured limit; it was not read."""

    status = 413
    code = "payload_too_large"


class HeadersTooLargeError(ClientError):
    """The request line and headers exceed the configured limit."""

    status = 431
    code = "request_header_fields_too_large"


class UpstreamError(GrifoError):
    """A point, or the fabric between gateway and points, failed."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class NoCompliantPointError(UpstreamError):
    """No point that the request's jurisdictions allow is up; nothing was sent anywhere else."""

    status = 503
    code = "no_compliant_point"


class PointUnavailableError(UpstreamError):
    """A point refused or dropped the connection before sending a byte; another may serve it."""

    status = 503
    code = "point_unavailable"
    retryable = True


class PointTimeoutError(UpstreamError):
    """A point did not answer in time."""

    status = 504
    code = "point_timeout"


class DeadlineExceededError(PointTimeoutError):
    """The request's own deadline (`x-grifo-timeout-ms` or the gateway default) passed."""

    code = "deadline_exceeded"


class PointProtocolError(UpstreamError):
    """A point answered with something that is not a valid response."""

    status = 502
    code = "point_protocol_error"


class OverloadedError(GrifoError):
    """Every compliant point is at its concurrency limit and the request was shed (lowest
    priority first); the response says when to retry (`retry-after`, seconds)."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailableError(GrifoError):
    """A shared store (PostgreSQL, Redis) the request needs did not answer; nothing was run."""

    status = 503
    type = "server_error"
    code = "store_unavailable"
