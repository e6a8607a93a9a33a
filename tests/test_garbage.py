"""Requests leave nothing for the garbage collector: what a request, a stream or a connection
makes is freed by reference counting as it ends. Objects in reference cycles wait for a
collection instead, and under load a young-generation collection that finds ~20,000 of them
stops the event loop for 8-30 ms (bench/README.md, "Garbage")."""

from __future__ import annotations

import asyncio
import gc
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from grifo.audit import merkle
from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response
from grifo.http.server import HttpServer
from tests.conftest import Runner
from tests.support.fabric import CHAT, Fabric, post_chat


def _ours(garbage: list[object]) -> list[str]:
    """What in `garbage` grifo made: instances of its classes, and its functions (closures)."""
    found = []
    for obj in garbage:
        if isinstance(obj, types.FunctionType):
            if (obj.__module__ or "").startswith("grifo."):
                found.append(f"function {obj.__qualname__}")
        elif type(obj).__module__.startswith("grifo."):
            found.append(type(obj).__qualname__)
    return found


@contextmanager
def collected() -> Iterator[list[object]]:
    """The objects that only the garbage collector could free, made inside the block: the
    list fills when the block ends (other threads' garbage of the time is in it too)."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[object] = []
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_merkle_proofs_of_a_batch_need_no_collection() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(9)]
    with collected() as garbage:
        root, paths = merkle.all_proofs(leaves)
        assert merkle.verify_inclusion(leaves[4], 4, 9, paths[4], root)
        del root, paths
    assert _ours(garbage) == []
    assert not [x for x in garbage if isinstance(x, list) and x and isinstance(x[0], bytes)]


def test_closed_connections_need_no_collection(run: Runner) -> None:
    """Both ends of grifo's HTTP: the server's protocol and the pool's connection, once the
    connection closed (the parser holds the protocol's callbacks, the transport the protocol)."""

    async def handle(request: Request) -> Response:
        return Response(200, b'{"ok":true}')

    async def main() -> None:
        server = HttpServer(handle)
        port = await server.start("127.0.0.1", 0)
        pool = ConnectionPool("127.0.0.1", port)
        try:
            for _ in range(5):
                answer = await pool.request("GET", "/", headers=[(b"connection", b"close")])
                assert answer.status == 200
                assert await answer.read() == b'{"ok":true}'
                del answer
            for _ in range(200):  # each connection_lost runs in a later turn of the loop
                if not server.connections and not pool._all:
                    break
                await asyncio.sleep(0.01)
            assert not server.connections
            assert not pool._all
        finally:
            await pool.close()
            await server.close(grace_s=1.0)

    with collected() as garbage:
        run(main())
    found = _ours(garbage)
    assert "HttpProtocol" not in found, found
    assert "_Connection" not in found, found


async def _post(port: int, key: str, body: dict[str, object]) -> bytes:
    raw = await post_chat(port, key, body)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    return raw


def _traffic(fabric: Fabric) -> Callable[[], None]:
    key, port = fabric.keys["demo-global"], fabric.running.port

    async def both() -> None:
        chat = {"model": CHAT, "messages": [{"role": "user", "content": "tidy up"}]}
        for _ in range(3):
            raw = await _post(port, key, {**chat, "stream": True})
            assert b"data: [DONE]" in raw
        # Whole answers together: their attestations are signed in one batch (Merkle proofs).
        await asyncio.gather(*(_post(port, key, chat) for _ in range(8)))

    def go() -> None:
        asyncio.run(both())
        deadline = time.monotonic() + 5
        while fabric.running.server.connections and time.monotonic() < deadline:
            time.sleep(0.01)  # the gateway's side of each connection closes a moment later
        time.sleep(0.05)

    return go


def test_streams_and_whole_answers_need_no_collection(fabric: Fabric) -> None:
    """Through the whole gateway: admission, dispatch, the stream's relay and metering, the
    deadline's timer, the audit record and a batch of attestations."""
    traffic = _traffic(fabric)
    traffic()  # first use: whatever is made once and kept
    with collected() as garbage:
        traffic()
    assert _ours(garbage) == []
