"""A cheap OpenAI-compatible point for benchmarks: canned answers, no engine.

Speaks grifo's point protocol (/health, /load, identity headers) so the gateway accepts it.
A chat request with `"stream": true` is answered with SSE: 20 content chunks 5 ms apart, a usage
chunk (no choices) and `data: [DONE]`, sent with chunked transfer encoding.
Usage: python bench/mock_point.py PORT [--reuse-port]   (--reuse-port: several processes share
the port, for benchmarks whose gateway outruns one mock process)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import msgspec
import uvloop

from grifo.http.message import Request, Response, StreamResponse
from grifo.http.server import HttpServer

NAME, JURISDICTION = "mock", "PE"
CHAT = msgspec.json.encode(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": "mock-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello " * 16},
                "finish_reason": "length",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 16, "completion_tokens": 64, "total_tokens": 80},
    }
)
HEALTH = msgspec.json.encode(
    {
        "status": "ready",
        "name": NAME,
        "jurisdiction": JURISDICTION,
        "models": [{"id": "mock-chat", "kind": "chat", "context_length": 4096}],
    }
)
STREAM_CHUNKS, STREAM_GAP_S = 20, 0.005


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0}
    return _event({**base, "model": "mock-chat", "choices": choices, **extra})


FIRST = _chunk(
    [{"index": 0, "delta": {"role": "assistant", "content": "hello "}, "finish_reason": None}]
)
MIDDLE = _chunk([{"index": 0, "delta": {"content": "hello "}, "finish_reason": None}])
LAST = _chunk([{"index": 0, "delta": {"content": "hello "}, "finish_reason": "length"}])
USAGE = _chunk([], usage={"prompt_tokens": 16, "completion_tokens": 20, "total_tokens": 36})
DONE = b"data: [DONE]\n\n"
LOAD = b'{"in_flight":0,"queued":0,"completed":0,"tokens_per_s":0.0}'
IDENT = [(b"x-grifo-point", NAME.encode()), (b"x-grifo-jurisdiction", JURISDICTION.encode())]


async def stream_body() -> AsyncIterator[bytes]:
    for i in range(STREAM_CHUNKS):
        if i:
            await asyncio.sleep(STREAM_GAP_S)
        yield FIRST if i == 0 else LAST if i == STREAM_CHUNKS - 1 else MIDDLE
    yield USAGE + DONE


def wants_stream(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    decoded = msgspec.json.decode(body)
    return isinstance(decoded, dict) and decoded.get("stream") is True


async def handle(request: Request) -> Response | StreamResponse:
    if request.path == "/v1/chat/completions":
        if wants_stream(request.body):
            return StreamResponse(200, stream_body(), headers=list(IDENT))
        return Response(200, CHAT, headers=list(IDENT))
    if request.path == "/health":
        return Response(200, HEALTH, headers=list(IDENT))
    if request.path == "/load":
        return Response(200, LOAD, headers=list(IDENT))
    return Response(404, b"{}", headers=list(IDENT))


async def main(port: int, reuse_port: bool) -> None:
    server = HttpServer(handle)
    await server.start("127.0.0.1", port, reuse_port=reuse_port)
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), "--reuse-port" in sys.argv[2:]))
