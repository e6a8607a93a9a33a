"""Idempotency keys: a retried request is answered from the first attempt, never charged twice.

Same `idempotency-key` (per tenant) and same body → the stored answer, marked
`idempotent-replayed: true`; same key while the first is still running → 409; same key with a
different body → 422. Requests without the header are not stored. The body is compared by a
fingerprint of its validated, re-encoded form, so whitespace and key order do not matter.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import msgspec

from grifo.errors import (
    ConflictError,
    InvalidRequestError,
    StoreUnavailableError,
    UnprocessableError,
)
from grifo.http.message import Response, StreamResponse
from grifo.store.records import StoredOutcome

log = logging.getLogger("grifo.idempotency")
HEADER = b"idempotency-key"
_KEPT = frozenset(
    {b"x-request-id", b"x-grifo-point", b"x-grifo-jurisdiction", b"x-grifo-cost-micros"}
)
_MAX_STORED_BYTES = 4 * 1024 * 1024


class KeyStore(Protocol):
    def claim_key(
        self, tenant: str, key: str, fingerprint: str, request_id: str, stale_ms: int
    ) -> StoredOutcome | None: ...

    def settle_key(
        self, tenant: str, key: str, status: int, headers: str, body: bytes, stream: bool
    ) -> None: ...

    def release_key(self, tenant: str, key: str, request_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Claim:
    tenant: str
    key: str
    request_id: str


def fingerprint(path: str, canonical_body: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\0" + canonical_body).hexdigest()


class Idempotency:
    def __init__(self, store: KeyStore, stale_s: float) -> None:
        self._store = store
        self._stale_ms = int(stale_s * 1000)

    def claim(self, tenant: str, raw_key: bytes, print_: str, request_id: str) -> Claim | Response:
        """A claim to proceed with, or the stored answer to replay; raises 409 or 422."""
        key = raw_key.decode("latin-1").strip()
        if not 1 <= len(key) <= 255 or not key.isprintable():
            raise InvalidRequestError(
                "idempotency-key must be 1 to 255 printable characters", param="idempotency-key"
            )
        held = self._store.claim_key(tenant, key, print_, request_id, self._stale_ms)
        if held is None:
            return Claim(tenant, key, request_id)
        if held.fingerprint != print_:
            raise UnprocessableError(
                "this idempotency-key was already used with a different request body",
                param="idempotency-key",
                code="idempotency_key_reused",
            )
        if held.status is None:
            raise ConflictError(
                "a request with this idempotency-key is still in progress; retry later",
                param="idempotency-key",
                code="idempotency_in_progress",
            )
        return _replay(held)

    def release(self, claim: Claim) -> None:
        """The request failed before any answer: the key may be used again (or, if the store
        is unreachable now, once the claim is stale)."""
        try:
            self._store.release_key(claim.tenant, claim.key, claim.request_id)
        except StoreUnavailableError:
            log.warning("could not release an idempotency key: the store is unavailable")

    def seal(self, claim: Claim, response: Response | StreamResponse) -> Response | StreamResponse:
        """Store the answer (a stream once it ends) under the claim, and pass it on."""
        if isinstance(response, Response):
            self._settle(claim, response.status, response.headers, response.body, False)
            return response
        return self._seal_stream(claim, response)

    def _seal_stream(self, claim: Claim, response: StreamResponse) -> StreamResponse:
        sent: list[bytes] = []
        size = [0]
        inner_body, inner_close = response.body, response.on_close

        async def body() -> AsyncIterator[bytes]:
            async for chunk in inner_body:
                if size[0] + len(chunk) <= _MAX_STORED_BYTES:
                    sent.append(chunk)
                    size[0] += len(chunk)
                yield chunk

        async def on_close(completed: bool) -> None:
            if inner_close is not None:
                await inner_close(completed)
            # What was produced was billed: a retry gets exactly that, cut short or not.
            self._settle(claim, response.status, response.headers, b"".join(sent), True)

        response.body, response.on_close = body(), on_close
        response.pipe = None  # the stored copy is taken from `body`
        return response

    def _settle(
        self,
        claim: Claim,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stream: bool,
    ) -> None:
        kept = {n.decode(): v.decode("latin-1") for n, v in headers if n in _KEPT}
        kept.setdefault("x-request-id", claim.request_id)
        try:
            self._store.settle_key(
                claim.tenant, claim.key, status, msgspec.json.encode(kept).decode(), body, stream
            )
        except StoreUnavailableError:
            # The answer was produced and billed: deliver it. A retry meanwhile gets 409 until
            # the claim is stale.
            log.warning("could not store an idempotent answer: the store is unavailable")


def _replay(held: StoredOutcome) -> Response:
    stored = msgspec.json.decode(held.headers or "{}", type=dict[str, str])
    headers = [(n.encode(), v.encode("latin-1")) for n, v in stored.items()]
    headers.append((b"idempotent-replayed", b"true"))
    content_type = b"text/event-stream" if held.stream else b"application/json"
    return Response(held.status or 200, held.body or b"", headers, content_type)
