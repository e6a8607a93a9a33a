"""The HTTP/1.1 server and pooled client, over real sockets on 127.0.0.1 (no mocks).

Every test runs on both the standard asyncio loop and uvloop (which production uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from grifo.errors import PointProtocolError, PointTimeoutError, PointUnavailableError
from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response, StreamResponse
from grifo.http.server import HttpServer, ServerLimits
from grifo.security.certs import init_ca, issue
from tests.conftest import Runner

SMALL = ServerLimits(
    max_body_bytes=1024,
    max_header_bytes=2048,
    max_headers=20,
    header_timeout_s=2.0,
    body_timeout_s=2.0,
    keepalive_timeout_s=5.0,
)
SECRET = "sekrit-detail-7f3a"


# -- a small application ------------------------------------------------------------------------
@dataclass
class App:
    """Routes by path; records every request it sees and what happened to its streams."""

    requests: list[Request] = field(default_factory=list)
    stream_closed: list[bool] = field(default_factory=list)
    on_close_calls: list[bool] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def __call__(self, request: Request) -> Response | StreamResponse:
        self.requests.append(request)
        if request.path == "/boom":
            raise RuntimeError(SECRET)
        if request.path == "/sleep":
            try:
                await asyncio.sleep(float(request.query))
            except asyncio.CancelledError:
                self.cancelled.append(request.path)
                raise
        if request.path in ("/stream", "/hang"):
            return StreamResponse(
                200, self._body(hang=request.path == "/hang"), on_close=self._on_close
            )
        payload = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode("latin-1"),
            "client": request.client,
        }
        return Response(200, json.dumps(payload).encode())

    async def _body(self, *, hang: bool) -> AsyncIterator[bytes]:
        try:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0)
            while hang:  # an endless token stream: only the client leaving ends it
                await asyncio.sleep(0.01)
                yield b"data: tick\n\n"
        finally:
            self.stream_closed.append(True)

    async def _on_close(self, completed: bool) -> None:
        self.on_close_calls.append(completed)


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[Request], Awaitable[Response | StreamResponse]],
    limits: ServerLimits = SMALL,
) -> AsyncIterator[tuple[HttpServer, int]]:
    server = HttpServer(handler, limits)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.close(grace_s=1.0)


# -- a raw client that parses responses itself --------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_only: bool = False, within_s: float = 3.0) -> RawResponse:
        return await asyncio.wait_for(self._response(head_only), within_s)

    async def _response(self, head_only: bool) -> RawResponse:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", f"expected a status line, got {head[:80]!r}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"repeated header {name}"
                headers[name.lower()] = value.strip()
        if head_only:
            return RawResponse(int(status), headers, b"")
        if headers.get("transfer-encoding") == "chunked":
            assert "content-length" not in headers
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                chunk = await self.reader.readexactly(size + 2)
                assert chunk.endswith(b"\r\n")
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.readexactly(int(headers["content-length"]))
        return RawResponse(int(status), headers, body)

    async def closed_by_peer(self, within_s: float = 3.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `within_s`."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), within_s)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        assert data == b"", f"unexpected bytes after the last response: {data[:200]!r}"
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw(port: int) -> AsyncIterator[Raw]:
    conn = await Raw.connect(port)
    try:
        yield conn
    finally:
        await conn.close()


def get(path: str, *, extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: t\r\n".encode() + extra + b"\r\n"


def post(path: str, body: bytes, *, extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n".encode()
    return head + extra + b"\r\n" + body


# -- server: keep-alive and pipelining --------------------------------------------------------
def test_two_requests_on_one_keep_alive_connection(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port), raw(port) as conn:
            await conn.send(get("/a?x=1"))
            first = await conn.response()
            await conn.send(post("/b", b"hello"))
            second = await conn.response()
            assert len(server.connections) == 1
        assert (first.status, second.status) == (200, 200)
        assert "connection" not in first.headers
        assert first.json()["path"] == "/a"
        assert first.json()["query"] == "x=1"
        assert second.json()["body"] == "hello"
        assert second.json()["method"] == "POST"
        assert first.headers["content-type"] == "application/json"
        assert app.requests[0].client == app.requests[1].client != ""

    run(main())


def test_pipelined_requests_are_answered_in_order(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            # The first is the slowest: answers must still come back in request order.
            await conn.send(
                get("/sleep?0.2") + get("/sleep?0.05") + post("/p", b"xyz") + get("/last")
            )
            answers = [await conn.response() for _ in range(4)]
        assert [a.json()["path"] for a in answers] == ["/sleep", "/sleep", "/p", "/last"]
        assert [a.json()["query"] for a in answers[:2]] == ["0.2", "0.05"]
        assert answers[2].json()["body"] == "xyz"

    run(main())


def test_more_pipelined_requests_than_are_held_pause_reading_and_all_are_answered(
    run: Runner,
) -> None:
    """Past 16 waiting requests the server stops reading the connection; it reads on as they
    are answered, and every one is answered in order."""
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(get("/sleep?0.1") + b"".join(get(f"/n{i}") for i in range(40)))
            answers = [await conn.response() for _ in range(41)]
            await conn.send(get("/after"))  # reading was resumed for good
            after = await conn.response()
        assert [a.json()["path"] for a in answers] == ["/sleep", *(f"/n{i}" for i in range(40))]
        assert after.json()["path"] == "/after"

    run(main())


def test_connection_close_is_honoured(run: Runner) -> None:
    async def main() -> None:
        async with serving(App()) as (_, port), raw(port) as conn:
            await conn.send(get("/x", extra=b"connection: close\r\n"))
            answer = await conn.response()
            assert answer.headers["connection"] == "close"
            assert await conn.closed_by_peer()

    run(main())


def test_head_response_carries_no_body(run: Runner) -> None:
    """RFC 9110 §9.3.2: a response to HEAD has no content, even if the handler produced one.

    The gateway routes HEAD like GET (api/app.py), so the server must drop the body; otherwise
    the body bytes are read as the start of the next response on a keep-alive connection.
    """

    async def main() -> None:
        async with serving(App()) as (_, port), raw(port) as conn:
            await conn.send(b"HEAD /h HTTP/1.1\r\nhost: t\r\n\r\n" + get("/next"))
            head = await conn.response(head_only=True)
            assert head.status == 200
            following = await conn.response()
            assert following.status == 200
            assert following.json()["path"] == "/next"

    run(main())


def test_idle_keep_alive_connection_is_closed(run: Runner) -> None:
    limits = ServerLimits(keepalive_timeout_s=0.2)

    async def main() -> None:
        async with serving(App(), limits) as (server, port), raw(port) as conn:
            await conn.send(get("/x"))
            assert (await conn.response()).status == 200
            assert await conn.closed_by_peer(within_s=2.0)
            await asyncio.sleep(0.05)
            assert not server.connections

    run(main())


def test_close_lets_in_flight_requests_finish(run: Runner) -> None:
    async def main() -> None:
        server = HttpServer(App(), SMALL)
        port = await server.start("127.0.0.1", 0)
        async with raw(port) as conn:
            await conn.send(get("/sleep?0.2"))
            await asyncio.sleep(0.05)
            closing = asyncio.create_task(server.close(grace_s=2.0))
            answer = await conn.response()
            assert answer.json()["path"] == "/sleep"
            assert await conn.closed_by_peer()  # and then the idle connection is closed
            await closing
        with pytest.raises(ConnectionRefusedError):
            await Raw.connect(port)

    run(main())


def test_expect_100_continue(run: Runner) -> None:
    async def main() -> None:
        async with serving(App()) as (_, port), raw(port) as conn:
            await conn.send(
                b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
            )
            interim = await conn.response(head_only=True)
            assert interim.status == 100
            await conn.send(b"abc")
            answer = await conn.response()
            assert answer.json()["body"] == "abc"

    run(main())


def test_expect_100_continue_over_limit_gets_413_not_continue(run: Runner) -> None:
    async def main() -> None:
        async with serving(App()) as (_, port), raw(port) as conn:
            await conn.send(
                b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 999999\r\n"
                b"expect: 100-continue\r\n\r\n"
            )
            assert (await conn.response()).status == 413
            assert await conn.closed_by_peer()

    run(main())


# -- server: body limits ---------------------------------------------------------------------
def test_content_length_over_limit_is_413_before_the_body_is_read(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port), raw(port) as conn:
            # Only the head is sent: the server must answer without waiting for 1 MiB of body.
            await conn.send(b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 1048576\r\n\r\n")
            answer = await conn.response()
            assert answer.status == 413
            assert answer.headers["connection"] == "close"
            assert answer.json()["error"]["code"] == "payload_too_large"
            assert await conn.closed_by_peer()
            await asyncio.sleep(0.05)
            assert not server.connections
        assert app.requests == []

    run(main())


def test_content_length_at_limit_is_accepted(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(post("/up", b"a" * SMALL.max_body_bytes))
            answer = await conn.response()
        assert answer.status == 200
        assert len(answer.json()["body"]) == SMALL.max_body_bytes

    run(main())


def test_chunked_body_over_limit_is_413(run: Runner) -> None:
    app = App()
    chunk = b"b" * 600

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            head = b"POST /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            # 3 × 600 bytes > 1024; no Content-Length to check up front.
            body = (b"%x\r\n%b\r\n" % (len(chunk), chunk)) * 3 + b"0\r\n\r\n"
            await conn.send(head + body)
            answer = await conn.response()
            assert answer.status == 413
            assert await conn.closed_by_peer()
        assert app.requests == []

    run(main())


def test_chunked_body_within_limit_is_reassembled(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            head = b"POST /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            await conn.send(head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            answer = await conn.response()
        assert answer.status == 200
        assert answer.json()["body"] == "abcde"

    run(main())


# -- server: hostile framing -------------------------------------------------------------------
HOSTILE = {
    "cl-and-te": (
        b"POST /s HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n"
    ),
    "te-and-cl": (
        b"POST /s HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
        b"content-length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n"
    ),
    "two-content-lengths": (
        b"POST /s HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ncontent-length: 30\r\n\r\n"
        b"abcGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n"
    ),
    "te-not-chunked-last": (
        b"POST /s HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    ),
    "garbage-request-line": b"HELLO THERE\r\n\r\n",
    "binary-garbage": b"\x00\x01\x02\xff\xfe GET / HTTP/1.1\r\n\r\n",
    "bad-header-name": b"GET / HTTP/1.1\r\nhost: t\r\nbad header: x\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length : 5\r\n\r\nabcde",
    "negative-content-length": b"POST /s HTTP/1.1\r\nhost: t\r\ncontent-length: -1\r\n\r\n",
    "upgrade-with-body": (
        b"POST /s HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
        b"content-length: 2\r\n\r\nab"
    ),
    "connect": b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nhost: t\r\n\r\n",
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_framing_is_400_and_closed(run: Runner, payload: bytes) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(payload)
            answer = await conn.response()
            assert answer.status == 400
            assert answer.headers["connection"] == "close"
            assert answer.json()["error"]["type"] == "invalid_request_error"
            assert await conn.closed_by_peer()
        assert app.requests == []

    run(main())


def test_oversized_headers_are_431(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(get("/x", extra=b"x-big: " + b"a" * 4096 + b"\r\n"))
            answer = await conn.response()
            assert answer.status == 431
            assert answer.json()["error"]["code"] == "request_header_fields_too_large"
            assert await conn.closed_by_peer()
        assert app.requests == []

    run(main())


def test_oversized_url_is_431(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(get("/" + "u" * 4096))
            assert (await conn.response()).status == 431
        assert app.requests == []

    run(main())


def test_too_many_headers_are_431(run: Runner) -> None:
    app = App()
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(SMALL.max_headers + 1))

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(get("/x", extra=many))
            assert (await conn.response()).status == 431
        assert app.requests == []

    run(main())


# -- server: slow clients ---------------------------------------------------------------------
def test_slow_request_head_is_408(run: Runner) -> None:
    limits = ServerLimits(header_timeout_s=0.3)
    app = App()

    async def main() -> None:
        async with serving(app, limits) as (_, port), raw(port) as conn:
            await conn.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n")  # the blank line never comes
            answer = await conn.response()
            assert answer.status == 408
            assert answer.json()["error"]["code"] == "request_timeout"
            assert await conn.closed_by_peer()
        assert app.requests == []

    run(main())


def test_silent_connection_is_closed_after_header_timeout(run: Runner) -> None:
    limits = ServerLimits(header_timeout_s=0.3)

    async def main() -> None:
        async with serving(App(), limits) as (_, port), raw(port) as conn:
            assert await conn.closed_by_peer(within_s=2.0)

    run(main())


def test_slow_body_is_408(run: Runner) -> None:
    limits = ServerLimits(body_timeout_s=0.3)
    app = App()

    async def main() -> None:
        async with serving(app, limits) as (_, port), raw(port) as conn:
            await conn.send(b"POST /b HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
            answer = await conn.response()
            assert answer.status == 408
            assert await conn.closed_by_peer()
        assert app.requests == []

    run(main())


def test_slow_pipelined_head_behind_a_busy_handler_still_times_out(run: Runner) -> None:
    """A partial second request sent while the first is being handled must not escape the
    header timeout: once the first answer is written, the connection must not stay open forever.
    """
    limits = ServerLimits(header_timeout_s=0.3, keepalive_timeout_s=0.3)

    async def main() -> None:
        async with serving(App(), limits) as (_, port), raw(port) as conn:
            await conn.send(get("/sleep?0.1") + b"GET /second HTTP/1.1\r\nhost: t\r\n")
            assert (await conn.response()).status == 200
            # Either a 408 or a plain close is acceptable; hanging on is not.
            try:
                answer = await conn.response(within_s=1.0)
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return
            except TimeoutError:
                pytest.fail("the half-sent pipelined request held the connection open")
            assert answer.status == 408

    run(main())


# -- server: handler failures -----------------------------------------------------------------
def test_handler_exception_is_500_without_detail(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(App()) as (_, port), raw(port) as conn:
            await conn.send(get("/boom"))
            answer = await conn.response()
            assert answer.status == 500
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "server_error"
            assert error["code"] == "internal_error"
            assert SECRET not in answer.body.decode()
            assert "Traceback" not in answer.body.decode()
            assert "RuntimeError" not in answer.body.decode()
            # The connection survives a handler failure.
            await conn.send(get("/after"))
            assert (await conn.response()).json()["path"] == "/after"

    run(main())
    assert SECRET in caplog.text  # the log keeps what the client must not see


# -- server: streaming --------------------------------------------------------------------------
def test_stream_response_is_chunked_and_reports_completion(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port), raw(port) as conn:
            await conn.send(get("/stream"))
            answer = await conn.response()
            assert answer.headers["transfer-encoding"] == "chunked"
            assert answer.headers["content-type"] == "text/event-stream"
            assert answer.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            # Still keep-alive after a completed stream.
            await conn.send(get("/after"))
            assert (await conn.response()).json()["path"] == "/after"
        assert app.on_close_calls == [True]
        assert app.stream_closed == [True]

    run(main())


def test_client_leaving_mid_stream_closes_body_and_reports_false(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port):
            async with raw(port) as conn:
                await conn.send(get("/hang"))
                head = await conn.response(head_only=True)
                assert head.headers["transfer-encoding"] == "chunked"
                assert (await conn.reader.readuntil(b"data: 2\n\n")).endswith(b"data: 2\n\n")
            for _ in range(100):
                if app.on_close_calls:
                    break
                await asyncio.sleep(0.01)
            assert app.on_close_calls == [False]
            assert app.stream_closed == [True]
            assert not server.connections

    run(main())


def test_client_leaving_cancels_a_running_handler(run: Runner) -> None:
    """The module promises "cancellation when the client leaves": a gateway that gives up on a
    point (head timeout) closes its connection, and the point must stop working for nobody,
    even while the handler has not written anything yet.
    """
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port):
            async with raw(port) as conn:
                await conn.send(get("/sleep?1.5"))
                await asyncio.sleep(0.1)
            for _ in range(50):
                if app.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert app.cancelled == ["/sleep"], "the handler kept running after the client left"
            assert not server.connections

    run(main())


# -- client: ConnectionPool ---------------------------------------------------------------------
def test_pool_get_and_post_round_trip_on_one_connection(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                first = await pool.request("GET", "/g?q=1")
                assert first.status == 200
                assert first.header(b"content-type") == "application/json"
                got = json.loads(await first.read())
                second = await pool.request(
                    "POST", "/p", headers=[(b"x-test", b"yes")], body=b'{"a":1}'
                )
                posted = json.loads(await second.read())
                third = await pool.request("GET", "/g3")
                await third.read()
                assert len(server.connections) == 1
            finally:
                await pool.close()
        assert (got["method"], got["path"], got["query"]) == ("GET", "/g", "q=1")
        assert (posted["method"], posted["body"]) == ("POST", '{"a":1}')
        assert app.requests[1].header(b"x-test") == "yes"
        assert len({r.client for r in app.requests}) == 1  # the connection was reused

    run(main())


def test_pool_opens_a_second_connection_for_concurrent_requests(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                a, b = await asyncio.gather(_sleep(pool, 0.1), _sleep(pool, 0.1))
                assert a["path"] == b["path"] == "/sleep"
            finally:
                await pool.close()
        assert len({r.client for r in app.requests}) == 2

    run(main())


async def _sleep(pool: ConnectionPool, seconds: float) -> Any:
    response = await pool.request("GET", f"/sleep?{seconds}")
    return json.loads(await response.read())


def test_pool_streams_a_chunked_body(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                response = await pool.request("GET", "/stream")
                assert response.status == 200
                assert response.header(b"transfer-encoding") == "chunked"
                chunks = [chunk async for chunk in response.iter_body()]
                # Reuse after a fully read stream.
                after = await pool.request("GET", "/after")
                await after.read()
                assert len(server.connections) == 1
            finally:
                await pool.close()
        assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert app.on_close_calls == [True]

    run(main())


def test_pool_abandoning_a_stream_closes_the_connection(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                response = await pool.request("GET", "/hang")
                body = response.iter_body()
                first = await body.__anext__()
                assert first.startswith(b"data: 0")
                await body.aclose()  # the rest is abandoned: the server must see the client go
                for _ in range(100):
                    if app.on_close_calls:
                        break
                    await asyncio.sleep(0.01)
                assert app.on_close_calls == [False]
                # A new request gets a fresh connection and works.
                again = await pool.request("GET", "/after")
                assert json.loads(await again.read())["path"] == "/after"
                assert len(server.connections) == 1
            finally:
                await pool.close()
        assert app.requests[0].client != app.requests[1].client

    run(main())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_pool_connection_refused_is_point_unavailable(run: Runner) -> None:
    async def main() -> None:
        pool = ConnectionPool("127.0.0.1", _closed_port())
        try:
            with pytest.raises(PointUnavailableError) as info:
                await pool.request("GET", "/x")
            assert info.value.retryable
            assert info.value.status == 503
        finally:
            await pool.close()

    run(main())


def test_pool_head_timeout_is_point_timeout(run: Runner) -> None:
    app = App()

    async def main() -> None:
        async with serving(app) as (_, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                with pytest.raises(PointTimeoutError):
                    await pool.request("GET", "/sleep?0.6", head_timeout_s=0.2)
                # The timed-out connection is dropped, not reused for the next request.
                response = await pool.request("GET", "/after")
                assert json.loads(await response.read())["path"] == "/after"
            finally:
                await pool.close()
        assert app.requests[0].client != app.requests[1].client

    run(main())


def test_pool_peer_closing_before_answering_is_point_unavailable(run: Runner) -> None:
    async def main() -> None:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

        listener = await asyncio.start_server(slam, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        pool = ConnectionPool("127.0.0.1", port)
        try:
            with pytest.raises(PointUnavailableError):
                await pool.request("GET", "/x")
        finally:
            await pool.close()
            listener.close()
            await listener.wait_closed()

    run(main())


def test_pool_forgets_idle_connections_the_server_closed(run: Runner) -> None:
    limits = ServerLimits(keepalive_timeout_s=0.1)
    app = App()

    async def main() -> None:
        async with serving(app, limits) as (_, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                first = await pool.request("GET", "/one")
                await first.read()
                await asyncio.sleep(0.3)  # the server closes the idle connection
                second = await pool.request("GET", "/two")
                assert json.loads(await second.read())["path"] == "/two"
            finally:
                await pool.close()

    run(main())


def test_a_request_never_awaited_takes_no_connection_from_the_pool(run: Runner) -> None:
    """`request()` hands back the exchange to await; one dropped unawaited leaves the pool's
    idle connection where it was, and the next request reuses it."""
    app = App()

    async def main() -> None:
        async with serving(app) as (server, port):
            pool = ConnectionPool("127.0.0.1", port)
            try:
                await (await pool.request("GET", "/one")).read()
                pool.request("GET", "/never").close()
                second = await pool.request("GET", "/two")
                assert json.loads(await second.read())["path"] == "/two"
                assert len(server.connections) == 1
                assert [r.path for r in app.requests] == ["/one", "/two"]
            finally:
                await pool.close()

    run(main())


@contextlib.asynccontextmanager
async def scripted(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A raw TCP server running `script` per connection, for misbehaving points."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await script(reader, writer)
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        for writer in writers:
            writer.close()
        await listener.wait_closed()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_pool_retries_once_when_a_reused_connection_is_closed_unanswered(run: Runner) -> None:
    """The point closes a keep-alive connection just as the pool reuses it (nothing answered):
    the pool tries once more on a fresh connection instead of failing the request."""
    connections: list[int] = []

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await reader.readuntil(b"\r\n\r\n")  # the second request on this connection ...
        # ... is dropped without a byte of answer.

    async def main() -> None:
        async with scripted(first_only) as port:
            pool = ConnectionPool("127.0.0.1", port)
            try:
                assert await (await pool.request("GET", "/1")).read() == b"ok"
                assert await (await pool.request("GET", "/2")).read() == b"ok"
            finally:
                await pool.close()
        assert len(connections) == 2

    run(main())


def test_pool_malformed_response_is_point_protocol_error(run: Runner) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPLAT 200 whatever\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with scripted(garbage) as port:
            pool = ConnectionPool("127.0.0.1", port)
            try:
                with pytest.raises(PointProtocolError):
                    await pool.request("GET", "/x")
            finally:
                await pool.close()

    run(main())


def test_pool_connection_dropped_mid_body_is_point_protocol_error(run: Runner) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async def main() -> None:
        async with scripted(truncated) as port:
            pool = ConnectionPool("127.0.0.1", port)
            try:
                response = await pool.request("GET", "/x")
                assert response.status == 200
                with pytest.raises(PointProtocolError):
                    await response.read()
            finally:
                await pool.close()

    run(main())


def test_pool_connects_to_connect_host_and_speaks_to_host(run: Runner, tmp_path: Path) -> None:
    """`connect_host` is where the TCP connection goes; the Host header stays the configured
    host (or `host_header`) and TLS verifies the certificate against `server_hostname`."""
    init_ca(tmp_path)
    issue(tmp_path, "api", ["localhost"])  # a certificate for localhost, served on 127.0.0.1
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "api.pem", tmp_path / "api.key")
    sni: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    seen: list[tuple[bytes, str]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append((head, writer.get_extra_info("sockname")[0]))
            writer.write(OK)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(pool: ConnectionPool) -> bytes:
        try:
            return await (await pool.request("GET", "/x")).read()
        finally:
            await pool.close()

    async def main() -> None:
        plain = await asyncio.start_server(answer, "127.0.0.1", 0)
        secure = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
        port, tls_port = (s.sockets[0].getsockname()[1] for s in (plain, secure))
        try:
            # "api.invalid" never resolves: the connection can only go to connect_host.
            pool = ConnectionPool("api.invalid", port, connect_host="127.0.0.1")
            assert await request(pool) == b"ok"
            pool = ConnectionPool(
                "api.invalid", port, connect_host="127.0.0.1", host_header="api.invalid"
            )
            assert await request(pool) == b"ok"
            pool = ConnectionPool(
                "api.invalid", tls_port, tls=client, connect_host="127.0.0.1",
                server_hostname="localhost",
            )  # fmt: skip
            assert await request(pool) == b"ok"
            for name in (None, "elsewhere.example"):  # the certificate is not for that name
                pool = ConnectionPool(
                    "api.invalid", tls_port, tls=client, connect_host="127.0.0.1",
                    server_hostname=name,
                )  # fmt: skip
                with pytest.raises(PointUnavailableError, match="TLS") as info:
                    await request(pool)
                assert isinstance(info.value.__cause__, ssl.SSLError)
            hosts = [head.split(b"\r\n")[1] for head, _ in seen]
            assert hosts == [
                f"host: api.invalid:{port}".encode(),
                b"host: api.invalid",
                f"host: api.invalid:{tls_port}".encode(),
            ]
            assert [peer for _, peer in seen] == ["127.0.0.1"] * 3
            assert sni == ["localhost", "api.invalid", "elsewhere.example"]
        finally:
            for server in (plain, secure):
                server.close()
                await server.wait_closed()

    run(main())


def test_pool_server_hostname_needs_tls() -> None:
    with pytest.raises(ValueError, match="server_hostname"):
        ConnectionPool("api.invalid", 443, server_hostname="api.invalid")
    with pytest.raises(ValueError, match="line break"):
        ConnectionPool("api.invalid", 80, host_header="a\r\nx-evil: 1")
