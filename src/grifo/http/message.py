"""The request and response values exchanged between the HTTP server and its handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

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

    `pipe`, when given, is the same body pushed rather than pulled: the server calls it with
    the client's connection (`ChunkSink`) instead of iterating `body`, and it returns once the
    body is over. A relay pipes each read of its source from that source's own callback, with
    no task wake-up per chunk. Whoever wraps `body` must wrap or drop `pipe` too.
    """

    status: int
    body: AsyncIterator[bytes]
    headers: Headers = field(default_factory=list)
    content_type: bytes = b"text/event-stream"
    on_close: Callable[[bool], Awaitable[None]] | None = None
    pipe: Callable[[ChunkSink], Awaitable[None]] | None = None


class ChunkSink(Protocol):
    """Where a piped body goes: the client's connection, as the HTTP server hands it over."""

    @property
    def closing(self) -> bool:
        """The client has gone (or is being closed): nothing more reaches it."""

    @property
    def writable(self) -> asyncio.Event:
        """Clear while the client's send buffer is full: stop reading the source until set."""

    def send_chunk(self, chunk: bytes) -> None:
        """One piece of the body (not empty), written at once."""


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]
