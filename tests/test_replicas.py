"""Three gateway processes sharing PostgreSQL and Redis: one budget, one ledger, one key set.

The budget race: 120 requests spread over three gateways race for a budget that holds exactly
twelve of them (each costs what its worst case reserves: eight output tokens at 1,000 micro-USD,
input free), so exactly twelve are served, whichever gateway they reach. Afterwards the ledger
invariants hold: one entry per served request, no reservation left open, Redis's spending
equals the ledger's.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis

from grifo.security.keys import generate_key
from tests.support.fabric import CHAT
from tests.support.processes import serve
from tests.support.stores import POSTGRES_URL, REDIS_URL

LIMIT_MICROS = 100_000
EACH_MICROS = 8 * 1000
REQUESTS = 120
LIMITED_PER_MIN = 20


def _gateway_yaml(point_port: int, pg_schema: str, redis_prefix: str) -> str:
    return f"""
gateway:
  health_interval_s: 0.2
  store: {{postgres_url: "{POSTGRES_URL}", postgres_schema: {pg_schema},
           redis_url: "{REDIS_URL}", redis_prefix: {redis_prefix}}}
points:
  - {{name: p1, site: lima, region: sa-west, jurisdiction: PE, tier: edge,
     url: "http://127.0.0.1:{point_port}",
     prices: {{default: {{input_usd_per_1m: 0, output_usd_per_1m: 1000}}}}}}
tenants:
  - {{name: acme, budget: {{usd: {LIMIT_MICROS / 1e6}, period: day, mode: strict}}}}
  - {{name: other, budget: {{usd: 1000, period: month, mode: strict}}}}
  - {{name: limited, limits: {{requests_per_min: {LIMITED_PER_MIN}}}}}
keys:
  - {{id: acme-1, tenant: acme, env: GRIFO_TEST_KEY}}
  - {{id: other-1, tenant: other, env: GRIFO_TEST_OTHER_KEY}}
  - {{id: limited-1, tenant: limited, env: GRIFO_TEST_LIMITED_KEY}}
"""


def _point(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """A point on the fake engine (it echoes the prompt's words as its tokens)."""
    point_yaml = tmp_path / "point.yaml"
    point_yaml.write_text(
        "points:\n  - {name: p1, site: lima, region: sa-west, jurisdiction: PE, tier: edge,\n"
        "     engine: {kind: fake, embeddings: fake, token_delay_ms: 3}}\n"
    )
    point, line = _start(["point", "--config", str(point_yaml), "--name", "p1", "--port", "0"], env)
    return point, int(json.loads(line)["port"])


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "grifo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


@pytest.fixture
def replicas(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> Iterator[tuple[list[int], tuple[str, str, str], str, str]]:
    key, other, limited = generate_key(), generate_key(), generate_key()
    env = os.environ | {
        "GRIFO_TEST_KEY": key,
        "GRIFO_TEST_OTHER_KEY": other,
        "GRIFO_TEST_LIMITED_KEY": limited,
    }
    procs: list[subprocess.Popen[str]] = []
    try:
        point, port = _point(tmp_path, env)
        procs.append(point)
        gateway_yaml = tmp_path / "gateway.yaml"
        gateway_yaml.write_text(_gateway_yaml(port, pg_schema, redis_prefix))
        ports = []
        for n in range(3):
            args = ["serve", "--config", str(gateway_yaml), "--port", "0"]
            gateway, banner = _start([*args, "--state-dir", str(tmp_path / f"gw{n}")], env)
            procs.append(gateway)
            match = re.search(r":(\d+)/v1", banner)
            assert match, "a gateway did not start"
            ports.append(int(match.group(1)))
        yield ports, (key, other, limited), pg_schema, redis_prefix
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            assert proc.wait(30) == 0, "a process did not stop cleanly"
            if proc.stdout is not None:
                proc.stdout.close()


def _chat(port: int, key: str, idempotency_key: str | None = None) -> tuple[int, dict[str, str]]:
    body = json.dumps(
        {
            "model": CHAT,
            "messages": [{"role": "user", "content": "a b c d e f g h"}],  # echoed: 8 tokens
            "max_tokens": 8,
        }
    )
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    if idempotency_key:
        headers["idempotency-key"] = idempotency_key
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def _metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_gateways_lease_a_budget_far_from_its_limit(
    replicas: tuple[list[int], tuple[str, str, str], str, str],
) -> None:
    """A budget with room for thousands of requests: each gateway leases a slice of it and
    reserves most requests without asking Redis; the spending still reaches Redis."""
    ports, (_, other, _), _, prefix = replicas
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _chat(ports[i % 3], other), range(90)))
    assert [status for status, _ in results] == [200] * 90
    billed = sum(int(h["x-grifo-cost-micros"]) for _, h in results)
    leased = sum(_metric(port, "grifo_budget_leased_total") for port in ports)
    assert leased >= 45, "most reservations came from the gateways' leases"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        [counters_key] = list(client.scan_iter(f"{prefix}:b:tenant:other:*"))
        for _ in range(500):
            if int(client.hget(counters_key, "sm") or 0) == billed:
                break
            time.sleep(0.01)
        assert int(client.hget(counters_key, "sm") or 0) == billed, "spending reached Redis"
        held = client.hgetall(counters_key.replace(b":b:", b":a:"))
        assert any(k.startswith(b"lease:") for k in held), "the gateways hold leases"
    finally:
        client.close()


def test_three_gateways_share_one_budget_and_one_ledger(
    replicas: tuple[list[int], tuple[str, str, str], str, str],
) -> None:
    ports, (key, other, limited), schema, prefix = replicas
    results: list[tuple[int, dict[str, str]]] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        for i in range(worker, REQUESTS, 24):
            outcome = _chat(ports[i % 3], key)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = [status for status, _ in results]
    assert len(statuses) == REQUESTS
    assert set(statuses) <= {200, 429}, statuses
    served = {h["x-request-id"] for status, h in results if status == 200}
    billed = sum(int(h["x-grifo-cost-micros"]) for status, h in results if status == 200)
    assert statuses.count(200) == LIMIT_MICROS // EACH_MICROS, "strict: exactly what fits"
    assert billed == statuses.count(200) * EACH_MICROS

    time.sleep(0.5)  # the gateways' ledger writers commit within milliseconds
    with psycopg.connect(POSTGRES_URL) as conn:
        rows = conn.execute(f"SELECT request_id, cost_micros FROM {schema}.ledger").fetchall()
    assert len(rows) == len(served), "one entry per served request"
    assert {r for r, _ in rows} == served
    assert sum(c for _, c in rows) == billed
    with psycopg.connect(POSTGRES_URL) as conn:
        audit = conn.execute(
            f"SELECT request_id, record::json->>'status' FROM {schema}.audit_records"
        ).fetchall()
    assert len(audit) == REQUESTS, "one audit record per request, refused ones too"
    assert {r for r, status in audit if status == "ok"} == served, "logs do not collide"
    refused = {status for _, status in audit if status != "ok"}
    assert refused == {"refused:429:insufficient_quota"}
    client_ = redis.Redis.from_url(REDIS_URL)
    [counters_key] = list(client_.scan_iter(f"{prefix}:b:tenant:acme:*"))
    counters = {k.decode(): int(v) for k, v in client_.hgetall(counters_key).items()}
    client_.close()
    assert (counters["rm"], counters["rt"]) == (0, 0), "every reservation settled"
    assert counters["sm"] == billed, "Redis's spending equals the ledger's"

    # A retried request is answered by another replica from the first answer, not re-run.
    status, first = _chat(ports[0], other, idempotency_key="same-request")
    again_status, again = _chat(ports[1], other, idempotency_key="same-request")
    assert (status, again_status, again.get("idempotent-replayed")) == (200, 200, "true")
    assert again["x-request-id"] == first["x-request-id"]

    # One rate limit across the replicas: a tenant allowed 20 requests a minute, asked 45
    # times across the three gateways at once, is served 20 (plus what refills meanwhile).
    started = time.monotonic()
    with ThreadPoolExecutor(15) as pool:
        limited_statuses = list(pool.map(lambda i: _chat(ports[i % 3], limited)[0], range(45)))
    refilled = int((time.monotonic() - started) * LIMITED_PER_MIN / 60) + 1
    assert set(limited_statuses) <= {200, 429}
    assert LIMITED_PER_MIN <= limited_statuses.count(200) <= LIMITED_PER_MIN + refilled


WORKER_REQUESTS = 61  # odd: two workers cannot have served the same number


def test_workers_of_one_gateway_share_postgres_and_redis(
    tmp_path: Path, pg_schema: str, redis_prefix: str
) -> None:
    """`serve --workers 2` on the shared stores, as a gateway pod given two CPUs runs with
    `--workers auto`: each worker keeps its own audit log in PostgreSQL, and both write one
    ledger and spend from one Redis budget."""
    key = generate_key()
    env = os.environ | {
        "GRIFO_TEST_KEY": generate_key(),
        "GRIFO_TEST_OTHER_KEY": key,
        "GRIFO_TEST_LIMITED_KEY": generate_key(),
    }
    point, point_port = _point(tmp_path, env)
    try:
        config = tmp_path / "gateway.yaml"
        config.write_text(_gateway_yaml(point_port, pg_schema, redis_prefix))
        gateway, port = serve(config, tmp_path / "state", env, workers=2)
        try:
            # A new connection each time: the kernel hands each to either worker.
            results = [_chat(port, key) for _ in range(WORKER_REQUESTS)]
        finally:
            gateway.terminate()
            assert gateway.wait(30) == 0, "the gateway did not stop cleanly"
            if gateway.stdout is not None:
                gateway.stdout.close()
    finally:
        point.terminate()
        point.wait(30)
        if point.stdout is not None:
            point.stdout.close()
    assert [status for status, _ in results] == [200] * WORKER_REQUESTS
    served = {h["x-request-id"] for _, h in results}
    billed = sum(int(h["x-grifo-cost-micros"]) for _, h in results)
    assert billed == WORKER_REQUESTS * EACH_MICROS

    # Stopped: every worker has committed its ledger rows and audit records.
    with psycopg.connect(POSTGRES_URL) as conn:
        rows = conn.execute(f"SELECT request_id, cost_micros FROM {pg_schema}.ledger").fetchall()
        logs = conn.execute(
            f"SELECT log, count(*), max(seq) + 1 FROM {pg_schema}.audit_records GROUP BY log"
        ).fetchall()
    assert sorted(r for r, _ in rows) == sorted(served), "one entry per request, none twice"
    assert sum(c for _, c in rows) == billed
    assert len(logs) == 2, f"one audit log per worker: {logs}"
    assert all(count == size > 0 for _, count, size in logs), "each log whole, from seq 0"
    assert sum(count for _, count, _ in logs) == WORKER_REQUESTS

    client = redis.Redis.from_url(REDIS_URL)
    try:
        [counters_key] = list(client.scan_iter(f"{redis_prefix}:b:tenant:other:*"))
        counters = {k.decode(): int(v) for k, v in client.hgetall(counters_key).items()}
    finally:
        client.close()
    assert counters["sm"] == billed, "Redis's spending equals the ledger's"
    assert (counters["rm"], counters["rt"]) == (0, 0), "every reservation settled"
