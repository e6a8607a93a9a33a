"""grifo's HTTP layer alone: its server and its pooled client passing every request to one
upstream as it came, with none of the pipeline (no key, policy, placement, metering, audit,
metrics). `compare.py` runs it as the `grifo HTTP layer` row: the floor under grifo's own row,
what the pipeline adds to.

Usage: python bench/bare_proxy.py PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response, StreamResponse
from grifo.http.server import HttpServer


async def main(port: int, upstream: int) -> None:
    pool = ConnectionPool("127.0.0.1", upstream)

    async def handle(request: Request) -> Response | StreamResponse:
        kind = request.headers.get(b"content-type", b"application/json")
        answer = await pool.request(
            request.method, request.path, headers=[(b"content-type", kind)], body=request.body
        )
        kind = answer.headers.get(b"content-type", b"application/json")
        if answer.complete:  # the usual whole answer: its body came with its head
            return Response(answer.status, answer.take_body(), content_type=kind)
        return StreamResponse(answer.status, answer.iter_body(), content_type=kind)

    server = HttpServer(handle)
    await server.start("127.0.0.1", port)
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
