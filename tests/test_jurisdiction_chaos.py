"""Randomized chaos: thousands of requests from tenants with random policies, data classes and
narrowing headers, against points that fail at random (500s, refused connections, slow or
silent answers), with retries, hedges, try timeouts and ejections at work. Compliance is
measured from the points' own records of what they received, not from the gateway's belief:
no request may ever reach a point outside its allowed set."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Mapping
from pathlib import Path

import msgspec

from grifo.config.load import parse_config
from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response
from grifo.http.server import HttpServer
from grifo.jurisdictions import expand, merge_blocs
from grifo.security.keys import generate_key, hash_key
from grifo.serve import start

TRIALS = int(os.environ.get("GRIFO_CHAOS_TRIALS", "10000"))
COUNTRIES = ["PE", "BR", "CL", "DE", "FR", "ES", "US", "CA"]
SEED = 20261126
Blocs = Mapping[str, frozenset[str]]
Tenant = tuple[str, list[str] | None, str]  # name, allowed jurisdictions, API key
ANSWER = msgspec.json.encode(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "chaos",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


class ChaosPoint:
    """A point that keeps its own record of every request id it received, and misbehaves on
    demand: `mode` is ok, error (answers 500), slow (answers after 15 ms), silent (never
    answers) or down (not listening: connections refused)."""

    def __init__(self, name: str, jurisdiction: str) -> None:
        self.name, self.jurisdiction = name, jurisdiction
        self.received: set[str] = set()
        self.mode = "ok"
        self.server = HttpServer(self.handle)
        self.port = 0
        self.ident = [
            (b"x-grifo-point", name.encode()),
            (b"x-grifo-jurisdiction", jurisdiction.encode()),
        ]

    async def weather(self, mode: str) -> None:
        if mode == "down" and self.mode != "down":
            await self.server.close(0.1)
        elif mode != "down" and self.mode == "down":
            self.server = HttpServer(self.handle)
            await self.server.start("127.0.0.1", self.port)
        self.mode = mode

    async def handle(self, request: Request) -> Response:
        if request.path == "/health":
            body = {
                "status": "ready",
                "name": self.name,
                "jurisdiction": self.jurisdiction,
                "models": [{"id": "chaos", "kind": "chat", "context_length": 2048}],
            }
            return Response(200, msgspec.json.encode(body), list(self.ident))
        if request.path == "/load":
            return Response(200, b'{"in_flight": 0, "queued": 0}', list(self.ident))
        self.received.add(request.headers.get(b"x-request-id", b"?").decode())
        if self.mode == "slow":
            await asyncio.sleep(0.015)
        elif self.mode == "silent":
            await asyncio.sleep(5)
        if self.mode == "error":
            return Response(500, b'{"error": {"message": "chaos"}}', list(self.ident))
        return Response(200, ANSWER, list(self.ident))


def topology(points: list[ChaosPoint], tenants: list[Tenant]) -> str:
    gateway = (
        "{health_interval_s: 0.05, audit: {enabled: false}, ejection: {base_s: 0.05}, "
        "dispatch: {try_timeout_s: 0.05, hedge_tiers: [any], hedge_initial_delay_ms: 5}}"
    )
    lines = [f"gateway: {gateway}", "points:"]
    lines += [
        f"  - {{name: {p.name}, site: s, region: r, jurisdiction: {p.jurisdiction}, "
        f"tier: edge, url: 'http://127.0.0.1:{p.port}'}}"
        for p in points
    ]
    lines.append("tenants:")
    for name, allowed, _ in tenants:
        policy = "" if allowed is None else f", allowed_jurisdictions: [{', '.join(allowed)}]"
        lines.append(f"  - {{name: {name}{policy}, data_classes: {{secret: [DE], open: null}}}}")
    lines.append("keys:")
    lines += [f"  - {{id: {n}-key, tenant: {n}, sha256: {hash_key(k)}}}" for n, _, k in tenants]
    return "\n".join(lines) + "\n"


def request_for(
    rng: random.Random, tenant: Tenant, blocs: Blocs
) -> tuple[list[tuple[bytes, bytes]], frozenset[str] | None]:
    """A request of `tenant` with a random data class and narrowing, and where it may run."""
    _, allowed, key = tenant
    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
    permitted = None if allowed is None else expand(allowed, blocs)
    data_class = rng.choice([None, "secret", "open"])
    if data_class is not None:
        headers.append((b"x-grifo-data-class", data_class.encode()))
        permitted = frozenset({"DE"}) if data_class == "secret" else None
    if rng.random() < 0.3:
        narrowing = frozenset(rng.sample(COUNTRIES, rng.randint(1, 3)))
        headers.append((b"x-grifo-allowed-jurisdictions", ",".join(sorted(narrowing)).encode()))
        permitted = narrowing if permitted is None else permitted & narrowing
    return headers, permitted


async def chaos(state_dir: Path) -> tuple[int, list[str], dict[str, int]]:
    rng = random.Random(SEED)
    points = [ChaosPoint(f"p{i}", rng.choice(COUNTRIES)) for i in range(10)]
    for p in points:
        p.port = await p.server.start("127.0.0.1", 0)
    tenants: list[Tenant] = []
    for i in range(20):
        codes = rng.sample([*COUNTRIES, "EU", "MERCOSUR"], rng.randint(1, 3))
        tenants.append((f"t{i}", None if i == 0 else sorted(codes), generate_key()))
    config = parse_config(topology(points, tenants), "chaos")
    blocs = merge_blocs(config.blocs)
    running = await start(config, state_dir, "127.0.0.1", 0, ready_timeout_s=5)
    client = ConnectionPool("127.0.0.1", running.port)
    violations: list[str] = []
    served = 0
    try:
        for trial in range(TRIALS):
            if trial % 50 == 0:  # a new weather: some points fail for a while
                for p in points:
                    modes = ["ok", "error", "down", "slow", "silent"]
                    await p.weather(rng.choices(modes, [12, 4, 2, 1, 1])[0])
            headers, permitted = request_for(rng, rng.choice(tenants), blocs)
            body = b'{"model": "chaos", "messages": [{"role": "user", "content": "hi"}]}'
            response = await client.request(
                "POST", "/v1/chat/completions", headers=headers, body=body, head_timeout_s=5
            )
            await response.read()
            request_id = response.headers.get(b"x-request-id", b"").decode()
            reached = {p.jurisdiction for p in points if request_id in p.received}
            if response.status == 200:
                served += 1
                reached.add(response.headers.get(b"x-grifo-jurisdiction", b"").decode())
            if permitted is not None and not reached <= permitted:
                violations.append(f"trial {trial}: reached {sorted(reached)}, allowed {permitted}")
    finally:
        await client.close()
        await running.stop(grace_s=1)
        for p in points:
            await p.weather("down")
    return served, violations, dict(running.gateway.dispatcher.counts.hedges)


def test_no_request_ever_reaches_a_point_outside_its_allowed_set(tmp_path: Path) -> None:
    served, violations, hedges = asyncio.run(chaos(tmp_path))
    assert hedges["sent"] > 0, "the chaos must exercise hedges too"
    assert violations == []
    assert served > TRIALS // 3, "most requests should still be served despite the chaos"
