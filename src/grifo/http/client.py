"""HTTP/1.1 client with a keep-alive pool per origin, on asyncio protocols and httptools.

Owns connection reuse, feeding each response (`upstream.py`) as its bytes are read, pausing
reads for a body not taken up yet, and translating socket failures into grifo's errors at this
seam: a refused or dropped connection before the response head is `PointUnavailableError` (safe
to try elsewhere), a silent peer is `PointTimeoutError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Coroutine
from typing import Any, cast

import httptools

from grifo.errors import (
    PointProtocolError,
    PointTimeoutError,
    PointUnavailableError,
    caused_by,
)
from grifo.http.message import Headers
from grifo.http.upstream import UpstreamResponse


class _Connection(asyncio.Protocol):
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        # Its loop, kept: Python 3.11's get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
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
        self._head = self.loop.create_future()
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

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Headers | None = None,
        body: bytes = b"",
        head_timeout_s: float = 60.0,
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """Send a request and wait for the response head: the exchange, to await (a plain
        call, so the caller's coroutines are one level shallower as they wait).

        Raises PointUnavailableError when the point cannot be reached or drops the connection
        before its first byte (nothing was answered: another point may be tried), and
        PointTimeoutError when the head does not arrive within `head_timeout_s`.
        """
        payload = self._encode(method, path, headers or [], body)
        return self._exchange(payload, head_timeout_s)

    async def _exchange(self, payload: bytes, head_timeout_s: float) -> UpstreamResponse:
        conn = self._idle.pop() if self._idle else None  # taken once the exchange runs
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            head = conn.send(payload)
            # A timer on the future itself: asyncio.wait_for would create a Task per request.
            timer = conn.loop.call_later(head_timeout_s, _expire, head)
            try:
                return await head
            except PointUnavailableError:
                if not reused or conn._got_bytes:
                    raise
                conn = None  # the point closed an idle connection as we reused it: one fresh try
            except TimeoutError:
                conn.abort()
                late = PointTimeoutError(f"the point did not answer within {head_timeout_s:g} s")
                raise caused_by(late, None)  # noqa: B904 (see caused_by)
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
            message = f"TLS with the point at {self.host}:{self.port} failed: {exc.reason}"
            raise caused_by(PointUnavailableError(message), exc)  # noqa: B904 (see caused_by)
        except (OSError, TimeoutError) as exc:
            message = f"cannot connect to the point at {self.host}:{self.port}"
            raise caused_by(PointUnavailableError(message), exc)  # noqa: B904 (see caused_by)
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
