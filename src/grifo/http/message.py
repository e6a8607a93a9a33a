"""The request and response values exchanged between the HTTP server and its handler."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Request:
    """One parsed HTTP request. Header names are lower-case bytes; the body is complete."""

    method: str
    path: str
    query: str
    headers: dict[bytes, bytes]
    body: bytes
    client: str = ""

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


@dataclass(slots=True)
class Response:
    """A complete response, written with one `write()`."""

    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)
    content_type: bytes = b"application/json"


@dataclass(slots=True)
class StreamResponse:
    """A response whose body is produced over time, sent with chunked transfer encoding.

    `on_close` runs once after the body ends, is abandoned, or the client goes away; it receives
    True when the whole body was written.
    """

    status: int
    body: AsyncIterator[bytes]
    headers: Headers = field(default_factory=list)
    content_type: bytes = b"text/event-stream"
    on_close: Callable[[bool], Awaitable[None]] | None = None


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]
