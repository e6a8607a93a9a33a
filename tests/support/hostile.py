"""What tests/test_hostile.py needs around a running gateway: a raw HTTP client that sends bytes
exactly as given, a trap socket that nothing may connect to, request bodies, and one server
connection fed from memory (for fuzzing the HTTP parser without sockets)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from grifo.http.connection import HttpProtocol
from grifo.http.message import Request, Response
from grifo.http.server import HttpServer, ServerLimits
from tests.support.fabric import CHAT, EMBED, Fabric
from tests.support.faulty import FaultyPoint

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
TRAP = "@TRAP@"  # replaced by the trap's URL when a request is sent
KEY = "@KEY@"  # replaced by the key of the tenant `hostile`
GOOD = b"Bearer " + KEY.encode()
HELLO = [{"role": "user", "content": "hello there"}]


class Trap:
    """A listening socket on loopback that counts the connections made to it."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connected = 0

    def connections(self) -> int:
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return self.connected
            conn.close()
            self.connected += 1

    def close(self) -> None:
        self._sock.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool | None = None  # whether the gateway closed the connection after answering

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket) -> Answer:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


@dataclass
class Gw:
    """The gateway under attack, its recording point and the trap."""

    fab: Fabric
    recorder: FaultyPoint
    trap: Trap

    @property
    def key(self) -> str:
        return self.fab.keys["hostile"]

    def connect(self, timeout_s: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.fab.running.port), timeout_s)

    def fill(self, data: bytes) -> bytes:
        data = data.replace(TRAP.encode(), self.trap.url.encode())
        return data.replace(KEY.encode(), self.key.encode())

    def raw(self, payload: bytes, *, expect_close: bool = False) -> Answer:
        """Send bytes as they are on a new connection and read one response."""
        with self.connect() as sock:
            sock.sendall(self.fill(payload))
            answer = read_answer(sock)
            if expect_close:
                sock.settimeout(3)
                try:
                    answer.closed = sock.recv(1) == b""
                except ConnectionResetError:
                    answer.closed = True
                except TimeoutError:
                    answer.closed = False
            return answer

    def post(
        self,
        path: str,
        body: bytes,
        *,
        auth: bytes | None = GOOD,
        headers: tuple[bytes, ...] = (),
    ) -> Answer:
        body = self.fill(body)
        lines = [f"POST {path} HTTP/1.1".encode(), b"host: gateway"]
        lines += [b"content-type: application/json", b"content-length: %d" % len(body), *headers]
        if auth is not None:
            lines.append(b"authorization: " + auth)
        return self.raw(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def assert_client_error(self, answer: Answer, status: int | None = None) -> dict[str, Any]:
        """A 4xx OpenAI envelope that leaks nothing; returns its `error` object."""
        assert 400 <= answer.status < 500, (answer.status, answer.body[:500])
        if status is not None:
            assert answer.status == status, answer.body[:500]
        assert answer.headers["content-type"] == "application/json"
        envelope = answer.json()
        assert set(envelope) == {"error"}, envelope
        error: dict[str, Any] = envelope["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str)
        assert isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        text = answer.body.decode("utf-8", "replace")
        assert "Traceback" not in text, text
        assert 'File "' not in text, text
        for tenant, key in self.fab.keys.items():
            assert key.split("-", 2)[2] not in text, "a key's secret is in an error"
            assert tenant == "hostile" or tenant not in text, f"{tenant} is named in an error"
        return error

    def trickle(
        self, head: bytes, data: bytes, gap_s: float, within_s: float
    ) -> tuple[bytes, float]:
        """Send `head`, then `data` a byte every `gap_s`; what came back until the gateway
        closed the connection, and how long that took."""
        start = time.monotonic()
        received = b""
        with self.connect() as sock:
            sock.sendall(head)
            sock.settimeout(gap_s)
            for i in range(len(data)):
                try:
                    sock.sendall(data[i : i + 1])
                    piece = sock.recv(65536)
                except TimeoutError:
                    if time.monotonic() - start > within_s:
                        break
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                received += piece
                if not piece:
                    break
        return received, time.monotonic() - start


def body_of(path: str = CHAT_PATH, **changes: Any) -> bytes:
    """A valid request body for `path`, with `changes`."""
    base: dict[str, Any] = {
        CHAT_PATH: {"model": CHAT, "messages": HELLO, "max_tokens": 8},
        COMPLETIONS_PATH: {"model": CHAT, "prompt": "hello there", "max_tokens": 8},
        EMBEDDINGS_PATH: {"model": EMBED, "input": "hello there"},
    }[path]
    return json.dumps(base | changes).encode()


def with_raw(path: str, name: str, literal: str | bytes) -> bytes:
    """A valid body with one more field whose value is raw JSON text (NaN, 1e309, ...)."""
    text = literal.encode() if isinstance(literal, str) else literal
    return body_of(path)[:-1] + b', "' + name.encode() + b'": ' + text + b"}"


def msg(**fields: Any) -> list[dict[str, Any]]:
    """One user message, with `fields` changed or added."""
    return [{"role": "user", "content": "hi"} | fields]


def request_bytes(*headers: bytes, body: bytes = b"", target: bytes = CHAT_PATH.encode()) -> bytes:
    """A POST with the hostile tenant's key and exactly these further header lines."""
    head = [b"POST " + target + b" HTTP/1.1", b"host: gateway", b"authorization: " + GOOD]
    return b"\r\n".join([*head, *headers]) + b"\r\n\r\n" + body


# -- one server connection, fed from memory -------------------------------------------------------
class MemoryTransport:
    """What HttpProtocol writes to."""

    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def feed(chunks: list[bytes], limits: ServerLimits) -> tuple[bytes, list[Request]]:
    """Feed the chunks to one server connection whose handler answers 200: what the server
    wrote, and the requests its handler was given."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(200, b"{}")

    async def main() -> bytes:
        transport = MemoryTransport()
        protocol = HttpProtocol(handler, limits, HttpServer(handler, limits))
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            protocol.data_received(chunk)  # must never raise
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        await asyncio.sleep(0)
        return transport.out

    return asyncio.run(main()), seen


def responses(out: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in what a server wrote (bodies with content-length)."""
    found = []
    rest = out
    while rest:
        assert rest.startswith(b"HTTP/1.1 "), rest[:100]
        head, _, rest = rest.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        found.append((int(head[9:12]), rest[:length]))
        rest = rest[length:]
    return found
