"""A point's stream piped to the client (`StreamRelay.pipe`): back-pressure both ways, and
the point's connection closed when the client leaves. Real sockets: a point server, a
relaying server in front of it, and a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
from collections.abc import AsyncIterator

from grifo.http.client import ConnectionPool
from grifo.http.message import ChunkSink, Request, Response, StreamResponse
from grifo.http.server import HttpServer
from grifo.metering.relay import StreamRelay
from grifo.metering.usage import Usage
from tests.conftest import Runner

EVENT = b"data: " + b'{"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'
MANY = 40_000  # ~41 MB of events


class Point:
    """Streams `count` events (0: endlessly, 10 ms apart); records how many it produced and
    whether its stream was closed."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.produced = 0
        self.closed = asyncio.Event()

    async def __call__(self, request: Request) -> Response | StreamResponse:
        return StreamResponse(200, self._events())

    async def _events(self) -> AsyncIterator[bytes]:
        try:
            while not self.count or self.produced < self.count:
                self.produced += 1
                yield EVENT
                if not self.count:
                    await asyncio.sleep(0.01)
            yield b"data: [DONE]\n\n"
        finally:
            self.closed.set()


class Relaying:
    """The gateway's part: the point's stream through a `StreamRelay`, piped."""

    def __init__(self, point_port: int) -> None:
        self.pool = ConnectionPool("127.0.0.1", point_port)
        self.outcomes: list[bool] = []

    async def __call__(self, request: Request) -> Response | StreamResponse:
        upstream = await self.pool.request("POST", "/", body=b"{}")
        relay = StreamRelay(upstream, False, _meter, self.outcomes.append)
        return StreamResponse(200, relay.body(), pipe=relay.pipe)


def _meter(usage: Usage, status: str, source: str) -> int:
    return 0


@contextlib.asynccontextmanager
async def chain(point: Point) -> AsyncIterator[tuple[Relaying, int]]:
    point_server, gateway_server = HttpServer(point), None
    try:
        point_port = await point_server.start("127.0.0.1", 0)
        gateway = Relaying(point_port)
        gateway_server = HttpServer(gateway)
        yield gateway, await gateway_server.start("127.0.0.1", 0)
    finally:
        if gateway_server is not None:
            await gateway_server.close(grace_s=0.5)
            await gateway.pool.close()
        await point_server.close(grace_s=0.5)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a client that lags
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def _settled(point: Point) -> int:
    """What the point has produced once it stops producing (0.3 s without a new event)."""
    last = -1
    while point.produced != last:
        last = point.produced
        await asyncio.sleep(0.3)
    return last


def test_a_client_that_does_not_read_stops_the_point_and_then_gets_everything(
    run: Runner,
) -> None:
    async def main() -> None:
        point = Point(MANY)
        async with chain(point) as (gateway, port):
            reader, writer = await _request(port)
            stalled_at = await _settled(point)  # the client has read nothing but the head
            chunks = []
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                chunks.append((await reader.readexactly(size + 2))[:-2])
            assert await reader.readexactly(2) == b"\r\n"  # the last chunk's
            await _close(writer)
        # Socket buffers hold ~10-15 MB on loopback; without back-pressure the point would
        # have sent everything into the relay's buffers by now.
        assert stalled_at < MANY * 3 // 4, "the relay kept reading from the point for nobody"
        events = b"".join(chunks).split(b"\n\n")
        assert events[:-2] == [EVENT[:-2]] * MANY
        assert events[-2:] == [b"data: [DONE]", b""]
        assert gateway.outcomes == [True]

    run(main())


def test_the_point_connection_closes_when_the_client_leaves_mid_stream(run: Runner) -> None:
    async def main() -> None:
        point = Point(0)  # never ends by itself
        async with chain(point) as (gateway, port):
            reader, writer = await _request(port)
            await reader.readuntil(b"\n\n")  # one event
            await _close(writer)
            await asyncio.wait_for(point.closed.wait(), 3)
            assert gateway.outcomes == []  # neither ended well nor failed: abandoned

    run(main())


def test_a_piped_head_goes_out_before_a_late_first_chunk(run: Runner) -> None:
    """The head waits for the first chunk to share its write, but never longer than a loop
    turn: a body with nothing to send yet still gets its head to the client at once."""
    release = asyncio.Event()

    async def late(sink: ChunkSink) -> None:
        await release.wait()
        sink.send_chunk(b"data: late\n\n")

    async def handler(request: Request) -> Response | StreamResponse:
        return StreamResponse(200, _nothing(), pipe=late)

    async def main() -> None:
        server = HttpServer(handler)
        port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200")
            release.set()
            chunk = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
            assert chunk == b"c\r\ndata: late\n\n\r\n0\r\n\r\n"
            await _close(writer)
        finally:
            await server.close(grace_s=0.5)

    run(main())


async def _nothing() -> AsyncIterator[bytes]:
    """The body of a response whose pipe is its body: never iterated."""
    chunks: list[bytes] = []
    for chunk in chunks:
        yield chunk


def test_events_are_metered_in_the_context_of_their_own_request(run: Runner) -> None:
    """The point's pooled connection was opened by the first request: its callbacks run in
    that request's context. A later stream's usage event must still be metered (and logged)
    in its own."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    metered_as: list[str] = []

    async def usage_stream(request: Request) -> Response | StreamResponse:
        return StreamResponse(200, _usage_events())

    async def main() -> None:
        point_server = HttpServer(usage_stream)
        pool = ConnectionPool("127.0.0.1", await point_server.start("127.0.0.1", 0))

        def meter(usage: Usage, status: str, source: str) -> int:
            metered_as.append(request_id.get())
            return 0

        async def handler(request: Request) -> Response | StreamResponse:
            request_id.set(request.path)
            upstream = await pool.request("POST", "/", body=b"{}")
            relay = StreamRelay(upstream, False, meter, lambda ok: None)
            return StreamResponse(200, relay.body(), pipe=relay.pipe)

        server = HttpServer(handler)
        port = await server.start("127.0.0.1", 0)
        try:
            for path in ("/first", "/second", "/third"):  # one pooled point connection
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
                await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 3)
                await _close(writer)
        finally:
            await server.close(grace_s=0.5)
            await pool.close()
            await point_server.close(grace_s=0.5)
        assert metered_as == ["/first", "/second", "/third"]

    run(main())


async def _usage_events() -> AsyncIterator[bytes]:
    yield b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    await asyncio.sleep(0.01)  # a read of its own, after the stream was committed
    yield b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    yield b"data: [DONE]\n\n"
