"""Misbehaving inference points for resilience tests and the chaos benchmark.

A `FaultyPoint` speaks grifo's point protocol (`/health`, `/load`, identity headers on every
answer) so the gateway's health checker accepts it, and answers `/v1/chat/completions` and
`/v1/completions` according to its `mode`, which may change while it runs:

- `ok`: a correct OpenAI answer (stream or not, with usage);
- `error`: 500 with an OpenAI error body;
- `hang`: never answers (with `health_ok=False`, `/health` and `/load` hang too);
- `trickle`: a 200 head at once, then one byte of body every 0.2 s, never finishing;
- `die_after_head`: a stream gets its head and role chunk, then the connection is aborted
  (`transport.abort()`: the client reads EOF in the middle of the chunked body); a whole
  answer gets nothing before the abort.

In a test: `with FaultyPoint("bad-lima", mode="hang") as point: ...`, or the fixture factory
`faulty_points` (import `fixture_faulty_points` into the test module). As a process:
`python -m tests.support.faulty --name N --jurisdiction PE --mode hang --port 0` prints
`{"event": "listening", "port": P}` and serves until SIGTERM or SIGINT.

Every inference request a point is sent is kept in `received` (the last 1024): what a point saw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

import msgspec
import pytest

from grifo.http.message import Request, Response, StreamResponse
from grifo.wire import responses
from tests.support.fabric import CHAT
from tests.support.threaded import ThreadedServer

T = TypeVar("T")
Mode = Literal["ok", "error", "hang", "trickle", "die_after_head"]
MODES: tuple[str, ...] = get_args(Mode)
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions")
TRICKLE_GAP_S = 0.2
ERROR_BODY = msgspec.json.encode(
    {
        "error": {
            "message": "injected failure",
            "type": "server_error",
            "param": None,
            "code": "injected",
        }
    }
)
WORDS = ["hello ", "from ", "a ", "faulty ", "point"]
PROMPT_TOKENS = 8


class _Ask(msgspec.Struct):
    """What a faulty point reads from an inference request."""

    model: str = CHAT
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class FaultyPoint:
    """An HTTP point in a background thread with its own event loop; see the module docstring."""

    def __init__(
        self,
        name: str,
        jurisdiction: str = "PE",
        mode: str = "error",
        *,
        health_ok: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.name = name
        self.jurisdiction = jurisdiction
        self.mode = mode
        self.health_ok = health_ok
        self.inference_requests = 0
        # What the point was sent (method, path, headers, body): the last 1024 inference requests.
        self.received: deque[Request] = deque(maxlen=1024)
        self._ident = [
            (b"x-grifo-point", name.encode()),
            (b"x-grifo-jurisdiction", jurisdiction.encode()),
        ]
        self._closed_flag = False
        self._threaded = ThreadedServer(self.handle, host, port, name=f"faulty-{name}")
        self._loop, self._server = self._threaded.loop, self._threaded.server
        self._closed = self._call(_new_event())
        self.port = self._threaded.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._threaded.call(coro)

    # -- routes ---------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response | StreamResponse:
        if request.path in ("/health", "/load"):
            if not self.health_ok:
                await self._hang(request)
            if request.path == "/load":
                load = {"in_flight": 0, "queued": 0, "completed": 0, "tokens_per_s": 0.0}
                return self._answer(200, msgspec.json.encode(load))
            return self._answer(200, self._health())
        if request.method != "POST" or request.path not in INFERENCE_PATHS:
            return self._answer(404, b'{"error": {"message": "no such route"}}')
        self.inference_requests += 1
        self.received.append(request)
        try:
            ask = msgspec.json.decode(request.body, type=_Ask)
        except msgspec.DecodeError as exc:
            return self._answer(400, msgspec.json.encode({"error": {"message": str(exc)}}))
        chat = request.path == "/v1/chat/completions"
        mode = self.mode
        if mode == "ok":
            return self._ok(ask, chat)
        if mode == "error":
            return self._answer(500, ERROR_BODY)
        if mode == "trickle":
            kind = b"text/event-stream" if ask.stream else b"application/json"
            body = self._trickle(request, ask, chat)
            return StreamResponse(200, body, list(self._ident), kind)
        if mode == "die_after_head" and ask.stream:
            return StreamResponse(200, self._die_after_role(request, ask, chat), list(self._ident))
        if mode == "die_after_head":
            self._abort(request)
            await _forever()
        await self._hang(request)
        raise AssertionError("unreachable: a hanging request ends by cancellation")

    def _answer(self, status: int, body: bytes) -> Response:
        return Response(status, body, list(self._ident))

    def _health(self) -> bytes:
        return msgspec.json.encode(
            {
                "status": "ready",
                "name": self.name,
                "jurisdiction": self.jurisdiction,
                "models": [{"id": CHAT, "kind": "chat", "context_length": 2048}],
            }
        )

    def _ok(self, ask: _Ask, chat: bool) -> Response | StreamResponse:
        if not ask.stream:
            return self._answer(200, _whole(ask, chat))
        headers = [*self._ident, (b"x-grifo-prompt-tokens", str(PROMPT_TOKENS).encode())]
        return StreamResponse(200, _stream_events(ask, chat), headers)

    # -- faults ---------------------------------------------------------------------------------
    async def _hang(self, request: Request) -> None:
        """Wait until the point closes, then drop the connection without an answer."""
        await self._closed.wait()
        self._abort(request)
        await _forever()

    async def _trickle(self, request: Request, ask: _Ask, chat: bool) -> AsyncIterator[bytes]:
        if ask.stream:
            source: Iterator[bytes] = _endless_sse(ask, chat)
        else:
            source = _endless_json(_whole(ask, chat))
        for piece in source:
            for i in range(len(piece)):
                if self._closed.is_set():  # never a complete body, even when closing
                    self._abort(request)
                    await _forever()
                yield piece[i : i + 1]
                await asyncio.sleep(TRICKLE_GAP_S)

    async def _die_after_role(
        self, request: Request, ask: _Ask, chat: bool
    ) -> AsyncIterator[bytes]:
        events = _stream_events(ask, chat)
        yield await anext(events)
        await events.aclose()
        self._abort(request)
        await _forever()

    def _abort(self, request: Request) -> None:
        """Drop the connection that carried `request` at once, unsent bytes and all: the client
        reads EOF wherever the answer was. The lost connection cancels the handler."""
        for conn in list(self._server.connections):
            transport = conn._transport
            if conn._client == request.client and transport is not None:
                transport.abort()

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed_flag:
            return
        self._closed_flag = True
        self._loop.call_soon_threadsafe(self._closed.set)
        self._threaded.close(0.2)

    def __enter__(self) -> FaultyPoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


async def _forever() -> None:
    """Wait until cancelled: an aborted connection cancels the work done for it."""
    await asyncio.Event().wait()


Frames = responses.ChatFrames | responses.CompletionFrames
ContentFrame = Callable[[str, str | None], bytes]


def _frames(ask: _Ask, chat: bool) -> tuple[Frames, ContentFrame, bytes]:
    """The frames of one answer, its content-chunk builder and its opening chunk (chat: the
    role)."""
    if chat:
        cf = responses.ChatFrames(ask.model)
        return (
            cf,
            lambda text, finish: cf.chunk({"content": text} if text else {}, finish),
            cf.chunk({"role": "assistant", "content": ""}),
        )
    tf = responses.CompletionFrames(ask.model)
    return tf, tf.chunk, tf.chunk("")


def _whole(ask: _Ask, chat: bool) -> bytes:
    frames, _, _ = _frames(ask, chat)
    return frames.complete("".join(WORDS), "stop", PROMPT_TOKENS, len(WORDS))


async def _stream_events(ask: _Ask, chat: bool) -> AsyncGenerator[bytes, None]:
    frames, content, opening = _frames(ask, chat)
    yield opening
    for word in WORDS:
        await asyncio.sleep(0)
        yield content(word, None)
    yield content("", "stop")
    if ask.include_usage:
        yield frames.usage_chunk(PROMPT_TOKENS, len(WORDS))
    yield responses.DONE


def _endless_sse(ask: _Ask, chat: bool) -> Iterator[bytes]:
    _, content, opening = _frames(ask, chat)
    yield opening
    while True:
        yield from (content(word, None) for word in WORDS)


def _endless_json(whole: bytes) -> Iterator[bytes]:
    """A JSON answer that never completes: all but its closing brace, then spaces forever."""
    yield whole[:-1]
    while True:
        yield b" "


@pytest.fixture(name="faulty_points")
def fixture_faulty_points() -> Iterator[Callable[..., FaultyPoint]]:
    """The fixture `faulty_points`, a factory of `FaultyPoint`s closed after the test:
    `faulty_points("bad-lima", mode="hang")`. Import `fixture_faulty_points` to use it."""
    made: list[FaultyPoint] = []

    def make(name: str = "bad-lima", jurisdiction: str = "PE", **kwargs: Any) -> FaultyPoint:
        point = FaultyPoint(name, jurisdiction, **kwargs)
        made.append(point)
        return point

    yield make
    for point in made:
        point.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faulty")
    parser.add_argument("--name", required=True)
    parser.add_argument("--jurisdiction", default="PE")
    parser.add_argument("--mode", choices=MODES, default="error")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--health-hangs", action="store_true", help="/health and /load hang too")
    args = parser.parse_args(argv)
    point = FaultyPoint(
        args.name,
        args.jurisdiction,
        args.mode,
        health_ok=not args.health_hangs,
        host=args.host,
        port=args.port,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"event": "listening", "port": point.port}), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        with contextlib.suppress(Exception):
            point.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
