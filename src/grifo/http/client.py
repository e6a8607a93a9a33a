"""HTTP/1.1 client with a keep-alive pool per origin, on asyncio protocols and httptools.

Owns connection reuse, streaming response bodies with read back-pressure, and translating socket
failures into grifo's errors at this seam: a refused or dropped connection before the response
head is `PointUnavailableError` (safe to try elsewhere), a silent peer is `PointTimeoutError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools

from grifo.errors import PointProtocolError, PointTimeoutError, PointUnavailableError
from grifo.http.message import Headers

_HIGH_WATER = 1024 * 1024


class UpstreamResponse:
    """A response whose head has arrived; the body is read with `read()` or `iter_body()`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: Exception | None = None
        self._on_chunk: Callable[[bytes], None] | None = None  # set by `deliver`
        self._on_end: Callable[[Exception | None], None] | None = None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    # -- fed by the connection --------------------------------------------------------------
    def _feed(self, chunk: bytes) -> None:
        if self._on_chunk is not None:
            self._on_chunk(chunk)
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._conn = None
        self._on_chunk = None  # a piped body's consumer: no cycle left through it
        self._wake()
        self._tell_end()

    def _tell_end(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self._error)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- consumer API -----------------------------------------------------------------------------
    async def next_chunk(self) -> bytes | None:
        """The next body bytes as they arrive (already de-chunked), or None at the end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._conn is not None and self._buffered <= _HIGH_WATER // 2:
                    self._conn.resume()
                return chunk
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def deliver(
        self, on_chunk: Callable[[bytes], None], on_end: Callable[[Exception | None], None]
    ) -> None:
        """Push the body instead of queueing it for `next_chunk`: the bytes already read go to
        `on_chunk` now, then each read as it arrives, from the connection's own callback; the
        end goes to `on_end`, once (None, or the error `next_chunk` would raise)."""
        held, self._chunks, self._buffered = self._chunks, deque(), 0
        self._on_chunk, self._on_end = on_chunk, on_end
        for chunk in held:
            on_chunk(chunk)
        if self._done:
            self._on_chunk = None
            self._tell_end()
        elif self._conn is not None:
            self._conn.resume()  # reads paused at the high-water mark go on

    def pause_reading(self) -> None:
        """Stop reading from the point until `resume_reading` (a slow client: back-pressure)."""
        if self._conn is not None:
            self._conn.pause()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def unread(self, data: bytes) -> None:
        """Put bytes already taken with `next_chunk` back in front of the rest."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield body bytes as they arrive; the connection is closed if the reader stops early."""
        try:
            while (chunk := await self.next_chunk()) is not None:
                yield chunk
        finally:
            self.close()

    @property
    def complete(self) -> bool:
        """The whole body has arrived, well."""
        return self._done and self._error is None

    def take_body(self) -> bytes:
        """The whole body of a `complete` response, at once."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_body()])

    def fail(self, error: Exception) -> None:
        """End the body now with `error` (a deadline): readers get it, the connection closes."""
        if not self._done:
            if self._conn is not None:
                self._conn.abort()
            self._finish(error)

    def close(self) -> None:
        """Abandon the rest of the body: the connection is closed, never reused half-read."""
        if not self._done and self._conn is not None:
            self._conn.abort()
        self._finish(self._error)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._got_bytes = False
        self.closed = False
        self.reused = False

    # -- asyncio protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        lost = PointUnavailableError("the point closed the connection before answering")
        if self._head is not None and not self._head.done():
            self._head.set_exception(lost)
        if self._response is not None:
            self._response._finish(PointProtocolError("the point closed the connection mid-body"))
            self._response = None
        self._parser = None  # it holds our callbacks: no cycle left for the garbage collector
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._parser is None:  # closed
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            error = PointProtocolError("the point sent a malformed HTTP response")
            if self._head is not None and not self._head.done():
                self._head.set_exception(error)
            if self._response is not None:
                self._response._finish(error)
            self.abort()

    # -- parser callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._response = UpstreamResponse(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None:
            return
        assert self._parser is not None  # parser callbacks run while it is fed
        response.status = self._parser.get_status_code()
        if self._head is not None and not self._head.done():
            self._head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response, self._response = self._response, None
        assert self._parser is not None
        keep_alive = self._parser.should_keep_alive()
        if response is not None:
            response._finish()
        self._head = None
        if keep_alive and not self.closed:
            self._pool._release(self)
        else:
            self.abort()

    # -- used by the pool and the response ----------------------------------------------------
    def send(self, payload: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self._transport is not None
        self._got_bytes = False
        self._head = asyncio.get_running_loop().create_future()
        self._transport.write(payload)
        return self._head

    def pause(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self._pool._forget(self)
        if self._transport is not None:
            self._transport.close()


def _expire(head: asyncio.Future[UpstreamResponse]) -> None:
    if not head.done():
        head.set_exception(TimeoutError())


class ConnectionPool:
    """Keep-alive connections to one origin (`host:port`).

    By default connections go to `host` (resolved by the loop), the `Host` header is
    `host:port` and, with `tls`, the server's certificate must match `host`. Three keywords
    split these apart, for a caller that has already resolved and vetted the address itself
    (the agent's HTTP tool pins the address its egress check approved, against DNS rebinding):

    - `connect_host`: the address (or name) connections are opened to, instead of `host`;
    - `server_hostname`: the TLS server name (SNI) the certificate is verified against,
      instead of `host` (only with `tls`);
    - `host_header`: the `Host` header's value, instead of `host:port` (ASCII, no line breaks).

    They are fixed here, once: requests do no extra work for them. A connection that cannot be
    opened raises PointUnavailableError chained (`raise ... from`) to the OSError, TimeoutError
    or ssl.SSLError that stopped it; one dropped after the request was sent has no such cause.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 256,
        connect_timeout_s: float = 2.0,
        tls: ssl.SSLContext | None = None,
        connect_host: str | None = None,
        server_hostname: str | None = None,
        host_header: str | None = None,
    ) -> None:
        if server_hostname is not None and tls is None:
            raise ValueError("server_hostname is for TLS: give tls too")
        if host_header is not None and any(c in host_header for c in "\r\n\0"):
            raise ValueError("host_header must not hold a line break")
        self.host = host
        self.port = port
        self._host_header = (host_header or f"{host}:{port}").encode("ascii")
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self._connect_timeout_s = connect_timeout_s
        self._tls = tls  # https: the server's certificate must match `server_hostname`
        self._connect_host = connect_host or host
        self._server_hostname = (server_hostname or host) if tls is not None else None
        self._all: set[_Connection] = set()

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Headers | None = None,
        body: bytes = b"",
        head_timeout_s: float = 60.0,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head.

        Raises PointUnavailableError when the point cannot be reached or drops the connection
        before its first byte (nothing was answered: another point may be tried), and
        PointTimeoutError when the head does not arrive within `head_timeout_s`.
        """
        payload = self._encode(method, path, headers or [], body)
        conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return await self._exchange(conn, payload, head_timeout_s)
            except PointUnavailableError:
                if conn._got_bytes:
                    raise
                # The point closed an idle connection as we reused it: one fresh try.
        conn = await self._connect()
        return await self._exchange(conn, payload, head_timeout_s)

    async def _exchange(
        self, conn: _Connection, payload: bytes, head_timeout_s: float
    ) -> UpstreamResponse:
        head = conn.send(payload)
        # A timer on the future itself: asyncio.wait_for would create a Task per request.
        timer = asyncio.get_running_loop().call_later(head_timeout_s, _expire, head)
        try:
            return await head
        except TimeoutError:
            conn.abort()
            raise PointTimeoutError(
                f"the point did not answer within {head_timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            timer.cancel()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            # In this task, not under wait_for: Python 3.11's wait_for drops a connection that
            # completes as the caller is cancelled (a losing hedge), leaving it open.
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self._connect_host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self._server_hostname,
                )
        except ssl.SSLError as exc:
            raise PointUnavailableError(
                f"TLS with the point at {self.host}:{self.port} failed: {exc.reason}"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise PointUnavailableError(
                f"cannot connect to the point at {self.host}:{self.port}"
            ) from exc
        self._all.add(conn)
        return conn

    def _encode(self, method: str, path: str, headers: Headers, body: bytes) -> bytes:
        parts = [method.encode("ascii"), b" ", path.encode("ascii"), b" HTTP/1.1\r\nhost: "]
        parts += (self._host_header, b"\r\ncontent-length: ", str(len(body)).encode("ascii"))
        parts.append(b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        return b"".join(parts)

    def _release(self, conn: _Connection) -> None:
        if len(self._idle) < self._max_idle:
            conn.reused = True
            self._idle.append(conn)
        else:
            conn.abort()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
