"""Many concurrent streams through one gateway process: each completes with its own content."""

from __future__ import annotations

import asyncio
import json
import time

from tests.support.fabric import CHAT, Fabric, post_chat

STREAMS = 512


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


async def _stream(port: int, key: str, i: int) -> str:
    body = {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": f"s{i} ok"}]}
    raw = await post_chat(port, key, body)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    text = []
    for line in _dechunk(chunked).split(b"\n"):
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(text)


def test_512_concurrent_streams_complete_with_their_own_content(fabric: Fabric) -> None:
    async def run_all() -> list[str]:
        key = fabric.keys["demo-global"]
        return await asyncio.gather(*(_stream(fabric.running.port, key, i) for i in range(STREAMS)))

    texts = asyncio.run(run_all())
    assert texts == [f"s{i} ok" for i in range(STREAMS)]
    deadline = time.monotonic() + 5
    while True:  # the ledger writer batches; give it a moment
        ok = [
            e
            for e in fabric.running.db.ledger()
            if e.status == "ok"
            and e.endpoint.endswith("chat/completions")
            and e.tenant == "demo-global"
            and e.usage_source == "point"
        ]
        if len(ok) >= STREAMS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(ok) >= STREAMS
