"""Rate limits shared in Redis: replicas draw from one allowance."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
from pathlib import Path

import pytest

from grifo.admission.shared_limits import SharedLimits
from grifo.config.model import LimitsConfig
from grifo.errors import RateLimitedError
from grifo.security.keys import Principal, generate_key
from grifo.store.redis_limits import RedisLimiter
from tests.support.fabric import CHAT
from tests.support.processes import serve
from tests.support.stores import REDIS_URL

ACME = Principal("acme", "k1", None)


def test_two_limiters_share_one_allowance(redis_prefix: str) -> None:
    async def scenario() -> None:
        limits = {"acme": LimitsConfig(requests_per_min=10, tokens_per_min=1000, concurrent=4)}
        a, b = (
            SharedLimits(RedisLimiter(REDIS_URL, prefix=redis_prefix), limits, {}) for _ in "ab"
        )
        try:
            with pytest.raises(RateLimitedError, match="lower max_tokens"):
                await b.acquire(ACME, 5000, "huge", 30)  # more than a minute's tokens
            outcomes = await asyncio.gather(
                *((a if i % 2 else b).acquire(ACME, 10, f"r{i}", 30) for i in range(8)),
                return_exceptions=True,
            )
            held = [o for o in outcomes if not isinstance(o, BaseException)]
            assert len(held) == 4, "four at once, across both gateways"
            assert all(isinstance(o, RateLimitedError) for o in outcomes if o not in held)
            for i, lease in enumerate(held):
                (a if i % 2 else b).done(lease, 5)
            await asyncio.sleep(0.05)  # the ends reach Redis within milliseconds
            more = await asyncio.gather(
                *(a.acquire(ACME, 10, f"m{i}", 30) for i in range(8)), return_exceptions=True
            )
            admitted = [o for o in more if not isinstance(o, BaseException)]
            assert len(admitted) == 4, "again four at once: the first four ended"
            with pytest.raises(RateLimitedError):
                await b.acquire(ACME, 10, "over", 30)  # 8 of 10 requests used, 4 running
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_two_gateway_processes_enforce_one_limit(tmp_path: Path, redis_prefix: str) -> None:
    key = generate_key()
    env = os.environ | {"GRIFO_TEST_KEY": key}
    config = tmp_path / "g.yaml"
    config.write_text(
        f"""
gateway: {{health_interval_s: 0.2, audit: {{enabled: false}},
          store: {{redis_url: "{REDIS_URL}", redis_prefix: {redis_prefix}}}}}
points:
  - {{name: p1, site: s, region: r, jurisdiction: PE, tier: edge,
     engine: {{kind: fake, embeddings: fake}}}}
tenants:
  - {{name: acme, limits: {{requests_per_min: 10}}}}
keys:
  - {{id: acme-1, tenant: acme, env: GRIFO_TEST_KEY}}
"""
    )
    gateways = []
    try:
        ports = []
        for n in range(2):
            proc, port = serve(config, tmp_path / f"gw{n}", env)
            gateways.append(proc)
            ports.append(port)
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        statuses = []
        started = time.monotonic()
        for i in range(30):
            conn = http.client.HTTPConnection("127.0.0.1", ports[i % 2], timeout=10)
            conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
            statuses.append(conn.getresponse().status)
            conn.close()
        refilled = int((time.monotonic() - started) / 6)  # 10 a minute: one more every 6 s
        assert 10 <= statuses.count(200) <= 10 + refilled, statuses
        assert set(statuses) == {200, 429}
    finally:
        for proc in gateways:
            proc.terminate()
        for proc in gateways:
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()


def test_limits_fail_open_when_redis_is_down(redis_prefix: str) -> None:
    from tests.support.stores import TcpRelay

    relay = TcpRelay("127.0.0.1", 6379)
    relay.cut()

    async def scenario() -> None:
        limiter = RedisLimiter(relay.url(REDIS_URL), prefix=redis_prefix)
        limits = SharedLimits(limiter, {"acme": LimitsConfig(requests_per_min=1)}, {})
        try:
            for i in range(3):
                lease = await limits.acquire(ACME, 10, f"r{i}", 30)
                limits.done(lease, 10)
            assert limits.unchecked == 3
        finally:
            await limits.close()

    asyncio.run(scenario())
