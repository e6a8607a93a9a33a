"""A cheap OpenAI-compatible point for benchmarks: canned answers, no engine.

Speaks grifo's point protocol (/health, /load, identity headers) so the gateway accepts it.
Usage: python bench/mock_point.py PORT
"""

from __future__ import annotations

import asyncio
import sys

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
LOAD = b'{"in_flight":0,"queued":0,"completed":0,"tokens_per_s":0.0}'
IDENT = [(b"x-grifo-point", NAME.encode()), (b"x-grifo-jurisdiction", JURISDICTION.encode())]


async def handle(request: Request) -> Response | StreamResponse:
    if request.path == "/v1/chat/completions":
        return Response(200, CHAT, headers=list(IDENT))
    if request.path == "/health":
        return Response(200, HEALTH, headers=list(IDENT))
    if request.path == "/load":
        return Response(200, LOAD, headers=list(IDENT))
    return Response(404, b"{}", headers=list(IDENT))


async def main(port: int) -> None:
    server = HttpServer(handle)
    await server.start("127.0.0.1", port)
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
