"""One client connection of the HTTP/1.1 server: an asyncio protocol parsed by httptools
(llhttp, strict mode).

Owns keep-alive, pipelining order, body and header limits checked before buffering, slow-client
timeouts, chunked streaming with write back-pressure (and the sink a piped body writes to), and
cancellation when the client leaves. It knows nothing about what a request means: that is the
handler's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from grifo.errors import (
    GrifoError,
    HeadersTooLargeError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from grifo.http.framing import response_head
from grifo.http.message import Handler, Request, Response, StreamResponse

if TYPE_CHECKING:
    from grifo.http.server import HttpServer, ServerLimits

log = logging.getLogger("grifo.http")

_MAX_PIPELINED = 16


class _Abort(Exception):
    """Raised inside parser callbacks to stop parsing with an HTTP error."""

    def __init__(self, error: GrifoError) -> None:
        super().__init__(error.message)
        self.error = error


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, limits: ServerLimits, server: HttpServer) -> None:
        self._handler = handler
        self._limits = limits
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._client = ""
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._pending: deque[tuple[Request, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = math.inf
        self._tick_s = max(
            0.05,
            min(limits.header_timeout_s, limits.body_timeout_s, limits.keepalive_timeout_s) / 2,
        )
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._in_message = False
        self._paused = False  # reading paused: too many pipelined requests waiting
        self._unsent_head = b""  # a piped stream's head, until its first chunk takes it along

    # -- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._server.draining:  # accepted just before the listener closed: nobody serves it
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        self._client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self._server.connections.add(self)
        self._arm(self._limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writable.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        # The parser holds this protocol's callbacks and the transport holds the protocol: let
        # go of both, so a closed connection is freed at once, not by the garbage collector.
        self._parser = None
        self._transport = None

    def eof_received(self) -> bool:
        # A client that stops sending has gone (HTTP clients do not half-close): closing makes
        # connection_lost cancel the work done for it, as nginx does on a client abort.
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except _Abort as abort:
            self._fail(abort.error)
        except httptools.HttpParserUpgrade:
            self._fail(InvalidRequestError("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Abort):
                self._fail(cause.error)
            else:
                self._fail(InvalidRequestError("malformed HTTP request"))

    # -- parser callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_bytes = 0
        if self._task is None or self._task.done():
            self._arm(self._limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        if len(self._headers) >= self._limits.max_headers:
            raise _Abort(HeadersTooLargeError("too many request headers"))
        key = name.lower()
        if key in self._headers:
            # Repeated headers are joined, as RFC 9110 allows for list-valued fields.
            self._headers[key] += b", " + value
        else:
            self._headers[key] = value

    def on_headers_complete(self) -> None:
        assert self._parser is not None  # parser callbacks run while it is fed
        if self._parser.should_upgrade():
            # CONNECT, or `Upgrade` with `Connection: upgrade`: refused here, before the request
            # could reach the handler (llhttp reports an upgrade only after the whole message).
            raise _Abort(InvalidRequestError("protocol upgrades are not supported"))
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body_bytes:
            raise _Abort(
                PayloadTooLargeError(
                    f"request body of {int(length)} bytes exceeds the limit of "
                    f"{self._limits.max_body_bytes} bytes"
                )
            )
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._task is None or self._task.done():
            self._arm(self._limits.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Abort(
                PayloadTooLargeError(
                    f"request body exceeds the limit of {self._limits.max_body_bytes} bytes"
                )
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        assert self._parser is not None
        url = self._url.decode("latin-1")
        path, _, query = url.partition("?")
        method = self._parser.get_method().decode("ascii")
        body = b"".join(self._body)  # a single piece comes back as it is
        request = Request(method, path, query, self._headers, body, self._client)
        self._pending.append((request, self._parser.should_keep_alive()))
        if len(self._pending) > _MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        if self._task is None or self._task.done():
            self._disarm()
            self._task = self._loop.create_task(self._serve_pending())

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._limits.max_header_bytes:
            raise _Abort(HeadersTooLargeError("request headers are too large"))

    # -- timers -----------------------------------------------------------------------------
    # One coarse timer per connection checks a deadline, so a request costs no timer churn:
    # `_arm` and `_disarm` only move the deadline. A timeout fires within 1.5x its value.
    def _arm(self, delay_s: float) -> None:
        self._deadline = self._loop.time() + delay_s
        if self._timer is None and not self._closing:
            self._timer = self._loop.call_later(self._tick_s, self._on_tick)

    def _disarm(self) -> None:
        self._deadline = math.inf

    def _on_tick(self) -> None:
        self._timer = None
        if self._closing:
            return
        if self._loop.time() >= self._deadline:
            self._on_timeout()
        else:
            self._timer = self._loop.call_later(self._tick_s, self._on_tick)

    def _on_timeout(self) -> None:
        if self._in_message:
            self._fail(RequestTimeoutError("the request was not received in time"))
        else:
            self._close()

    # -- responding ---------------------------------------------------------------------------
    async def _serve_pending(self) -> None:
        while self._pending and not self._closing:
            request, keep_alive = self._pending.popleft()
            keep_alive = keep_alive and not self._server.draining
            try:
                response = await self._handler(request)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                error = GrifoError("internal error")
                response = Response(error.status, error.envelope())
            if isinstance(response, StreamResponse):
                await self._stream(response, keep_alive)
            else:
                self._write_response(response, keep_alive, request.method != "HEAD")
            if not keep_alive:
                self._close()
                return
            if self._paused and len(self._pending) <= _MAX_PIPELINED:
                self._paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
        if self._closing:
            return
        if self._in_message:
            # A pipelined request started arriving while we were busy: it gets no more time
            # than any other request to finish arriving.
            self._arm(self._limits.header_timeout_s)
        else:
            self._arm(self._limits.keepalive_timeout_s)

    def _write_response(self, response: Response, keep_alive: bool, with_body: bool) -> None:
        """Head and body in one write; a HEAD request gets the head only (RFC 9110 9.3.2)."""
        if self._transport is None or self._closing:
            return
        head = response_head(
            response.status, response.content_type, response.headers, len(response.body), keep_alive
        )
        self._transport.write(head + response.body if with_body else head)

    async def _stream(self, response: StreamResponse, keep_alive: bool) -> None:
        completed = False
        try:
            if self._transport is None or self._closing:
                return
            head = response_head(
                response.status, response.content_type, response.headers, None, keep_alive
            )
            if response.pipe is not None:
                # The head goes out with the first chunk, which a relay usually has at hand:
                # one write and one wake-up of the client, not two. A loop turn later at most.
                self._unsent_head = head
                self._loop.call_soon(self._send_head)
                await response.pipe(self)
                self._send_head()
            else:
                self._transport.write(head)
                async for chunk in response.body:
                    if self.closing:  # the client may leave while we awaited the body
                        return
                    if chunk:
                        self.send_chunk(chunk)
                    if not self._writable.is_set():
                        await self._writable.wait()
            if not self.closing:
                self._transport.write(b"0\r\n\r\n")
                completed = True
        finally:
            await _close_iterator(response)
            if response.on_close is not None:
                await response.on_close(completed)

    def _fail(self, error: GrifoError) -> None:
        """Answer a protocol-level error and close: the byte stream can no longer be trusted."""
        if self._transport is not None and not self._closing:
            body = error.envelope()
            busy = self._task is not None and not self._task.done()
            if not busy:
                head = response_head(error.status, b"application/json", [], len(body), False)
                self._transport.write(head + body)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- a piped body's sink (`ChunkSink`) ---------------------------------------------------
    @property
    def writable(self) -> asyncio.Event:
        return self._writable

    def send_chunk(self, chunk: bytes) -> None:
        if self._transport is not None and not self._closing:
            framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if self._unsent_head:
                framed, self._unsent_head = self._unsent_head + framed, b""
            self._transport.write(framed)

    def _send_head(self) -> None:
        if self._unsent_head:
            if self._transport is not None and not self._closing:
                self._transport.write(self._unsent_head)
            self._unsent_head = b""

    @property
    def busy(self) -> bool:
        return (self._task is not None and not self._task.done()) or bool(self._pending)

    def close_if_idle(self) -> None:
        if not self.busy:
            self._close()


async def _close_iterator(response: StreamResponse) -> None:
    aclose = getattr(response.body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
