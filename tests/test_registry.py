"""Points join and leave: real point processes register with running gateways, heartbeat,
deregister on SIGTERM and expire when killed; join tokens bound what a point may claim.

The gateway runs in-process (tests/support/fabric.py) on SQLite, or as two `grifo serve`
processes sharing PostgreSQL; every point is `python -m grifo point --register ...`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from grifo.store.postgres import PostgresDB
from grifo.store.registry_sql import RegistryTables
from grifo.store.sqlite import StateDB
from tests.support.fabric import CHAT, Fabric
from tests.support.processes import serve
from tests.support.stores import POSTGRES_URL

PERU = "gjt-0a1b2c3d-peru-secret-token-for-tests-only-0000000000"
ZEROS = "0" * 64
ANDES = "gjt-4e5f6a7b-andes-secret-token-for-tests-only-000000000"


def _topology(heartbeat_s: float = 0.5, expire_after_s: float = 3.0) -> str:
    peru_sha = hashlib.sha256(PERU.encode()).hexdigest()
    return f"""
gateway:
  demo_keys: true
  health_interval_s: 0.2
  registry:
    heartbeat_s: {heartbeat_s}
    expire_after_s: {expire_after_s}
    tokens:
      - {{id: peru, sha256: "{peru_sha}", jurisdictions: [PE], tiers: [edge],
         name_pattern: "lima-.*"}}
      - {{id: andes, env: GRIFO_TEST_ANDES_TOKEN, jurisdictions: [ANDEAN]}}
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {{kind: fake, embeddings: fake}},
     prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 0.02, output_usd_per_1m: 0.04}}}}}}
tenants:
  - {{name: demo-latam, allowed_jurisdictions: [PE]}}
  - {{name: demo-eu, allowed_jurisdictions: [EU]}}
"""


@pytest.fixture
def fabric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fabric]:
    monkeypatch.setenv("GRIFO_TEST_ANDES_TOKEN", ANDES)
    fab = Fabric.from_yaml(_topology(), tmp_path / "state")
    yield fab
    fab.close()


@pytest.fixture
def quick_fabric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fabric]:
    """Registrations expire after 2 s without a heartbeat."""
    monkeypatch.setenv("GRIFO_TEST_ANDES_TOKEN", ANDES)
    fab = Fabric.from_yaml(_topology(0.5, 2.0), tmp_path / "state")
    yield fab
    fab.close()


class Point:
    """`grifo point --register ...` as a process."""

    def __init__(self, tmp: Path, name: str, *gateways: str, token: str = PERU) -> None:
        self.log = tmp / f"{name}.log"
        args = [sys.executable, "-m", "grifo", "--log-level", "info", "point", "--name", name]
        args += ["--jurisdiction", "PE", "--tier", "edge", "--engine", "fake", "--port", "0"]
        for gateway in gateways:
            args += ["--register", gateway]
        env = os.environ | {"GRIFO_JOIN_TOKEN": token, "GRIFO_STATE_DIR": str(tmp)}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the point did not start: {self.log.read_text()}"
        self.port = int(json.loads(line)["port"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _points(fabric: Fabric) -> dict[str, tuple[str, bool]]:
    """The gateway's points as (source, healthy), read on its own event loop."""

    async def read() -> dict[str, tuple[str, bool]]:
        return {p.name: (p.source, p.healthy) for p in fabric.running.gateway.points}

    return fabric.call(read())


def _call(
    port: int, method: str, path: str, body: object = None, token: str | None = PERU
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body))
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _chat(port: int, key: str) -> tuple[int, str | None]:
    """(status, the point that answered) of one small chat request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("x-grifo-point")
    finally:
        conn.close()


def _identity(name: str, **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": name,
        "site": "lima",
        "region": "sa-west",
        "jurisdiction": "PE",
        "tier": "edge",
        "url": "http://127.0.0.1:9",  # nothing listens: registered, never up
    }
    return body | changes


def test_a_point_registers_and_serves_traffic(fabric: Fabric, tmp_path: Path) -> None:
    point = Point(tmp_path, "lima-2", fabric.url)
    try:
        _wait(lambda: _points(fabric).get("lima-2") == ("registered", True), "lima-2 up")
        # lima-2 is nearer and cheaper than the configured lima-edge: it gets the traffic.
        raw = fabric.client("demo-latam").chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-grifo-point"] == "lima-2"
        assert raw.headers["x-grifo-jurisdiction"] == "PE"
        row = fabric.ledger(raw.headers["x-request-id"])[raw.headers["x-request-id"]]
        assert (row.point, row.jurisdiction) == ("lima-2", "PE")
        # A tenant that may not use Peru never reaches it, registered or not.
        status, _ = _chat(fabric.running.port, fabric.keys["demo-eu"])
        assert status == 503
        _wait(
            lambda: b'grifo_point_heartbeat_age_seconds{point="lima-2"}' in _metrics(fabric),
            "a heartbeat",
        )
        assert _points(fabric)["lima-edge"] == ("static", True)
    finally:
        point.stop()


def _metrics(fabric: Fabric) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", fabric.running.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read()
    finally:
        conn.close()


def test_a_token_cannot_register_outside_its_scope(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="grifo.registry")
    port, path = fabric.running.port, "/v1/grifo/points"
    status, answer = _call(port, "POST", path, _identity("lima-3", jurisdiction="DE"))
    assert status == 403, answer
    assert answer["error"]["code"] == "registration_out_of_scope"
    assert answer["error"]["param"] == "jurisdiction"
    for changes, param in (({"tier": "central"}, "tier"), ({"name": "cusco-1"}, "name")):
        status, answer = _call(port, "POST", path, _identity("lima-3") | changes)
        assert (status, answer["error"]["param"]) == (403, param), answer
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("lima-3 (DE, edge) with join token peru" in line for line in refusals), refusals
    assert not any(PERU in r.getMessage() or ANDES in r.getMessage() for r in caplog.records)
    assert "lima-3" not in _points(fabric)
    # Without a valid token nothing is even read.
    for token in (None, "gjt-00000000-wrong", ANDES + "x"):
        status, answer = _call(port, "POST", path, _identity("lima-3"), token=token)
        assert (status, answer["error"]["code"]) == (401, "invalid_join_token")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (_identity("lima-3", jurisdiction="XX"), "jurisdiction", "invalid_request"),
        (_identity("lima-3", jurisdiction="EU"), "jurisdiction", "invalid_request"),
        (_identity("lima-3", rtt_ms=-1), "rtt_ms", "invalid_request"),
        (_identity("lima-3", url="ftp://127.0.0.1:21"), "url", "invalid_request"),
        (_identity("lima-3", url="http://169.254.169.254:80"), "url", "url_refused"),
        (_identity("lima-3", url="http://[fe80::1]:80"), "url", "url_refused"),
        (_identity("lima-3", url="http://100.100.100.200:80"), "url", "url_refused"),
        (_identity("lima-3", url="http://0.0.0.0:80"), "url", "url_refused"),
        (_identity("lima-3", api_base="http://x"), "api_base", "unsupported_parameter"),
        ({"site": "lima"}, "name", "invalid_request"),
        (
            json.dumps(_identity("lima-3")).replace("{", '{"name": "lima-4", ', 1).encode(),
            "name",
            "duplicate_key",
        ),
        (b"{", None, "invalid_json"),
    ],
)
def test_bad_registrations_are_400_naming_the_field(
    fabric: Fabric, body: object, param: str | None, code: str
) -> None:
    status, answer = _call(fabric.running.port, "POST", "/v1/grifo/points", body)
    assert status == 400, answer
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
    assert "lima-3" not in _points(fabric)


def test_a_name_is_held_by_a_static_point_or_a_live_registration(fabric: Fabric) -> None:
    port, path = fabric.running.port, "/v1/grifo/points"
    status, answer = _call(port, "POST", path, _identity("lima-edge"))
    assert (status, answer["error"]["code"]) == (409, "point_name_taken"), answer
    assert _call(port, "POST", path, _identity("lima-9"))[0] == 201
    status, answer = _call(port, "POST", path, _identity("lima-9"), token=ANDES)
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (
        409,
        "point_name_taken",
        "name",
    )
    assert _call(port, "POST", path, _identity("lima-9", rtt_ms=7))[0] == 201  # its own again
    beat = {"in_flight": 1, "queued": 2, "tokens_per_s": 3.5, "cache_usage": 0.25}
    assert _call(port, "POST", f"{path}/lima-9/heartbeat", beat)[0] == 200
    status, answer = _call(port, "POST", f"{path}/lima-9/heartbeat", beat, token=ANDES)
    assert (status, answer["error"]["code"]) == (404, "point_not_registered")
    status, answer = _call(port, "POST", f"{path}/lima-9/heartbeat", {"queued": -1})
    assert (status, answer["error"]["param"]) == (400, "queued")
    assert _call(port, "DELETE", f"{path}/lima-9", token=ANDES)[0] == 404
    assert _call(port, "DELETE", f"{path}/lima-9")[0] == 200
    assert "lima-9" not in _points(fabric)
    assert _call(port, "POST", path, _identity("lima-9"), token=ANDES)[0] == 201  # free now
    assert _points(fabric)["lima-9"][0] == "registered"
    assert _call(port, "POST", f"{path}/lima-10/heartbeat", beat)[0] == 404


def test_sigterm_deregisters_and_drains_without_failed_requests(
    fabric: Fabric, tmp_path: Path
) -> None:
    point = Point(tmp_path, "lima-2", fabric.url)
    results: list[tuple[float, int, str | None]] = []
    done = threading.Event()

    def load() -> None:
        key = fabric.keys["demo-latam"]
        while not done.is_set():
            started = time.monotonic()
            status, served_by = _chat(fabric.running.port, key)
            results.append((started, status, served_by))

    worker = threading.Thread(target=load)
    try:
        _wait(lambda: _points(fabric).get("lima-2") == ("registered", True), "lima-2 up")
        worker.start()
        _wait(lambda: any(p == "lima-2" for _, _, p in results), "traffic on lima-2")
        point.proc.send_signal(signal.SIGTERM)
        _wait(lambda: "lima-2" not in _points(fabric), "lima-2 deregistered")
        removed = time.monotonic()  # every request placed after this went elsewhere
        assert point.proc.wait(30) == 0
        count = len(results)
        _wait(lambda: len(results) > count + 20, "traffic after the drain")
    finally:
        done.set()
        if worker.is_alive():
            worker.join(30)
        point.stop()
    assert [r for r in results if r[1] != 200] == [], "a request failed during the drain"
    late = [r for r in results if r[0] > removed and r[2] == "lima-2"]
    assert late == [], "a request was placed on a deregistered point"
    assert results[-1][2] == "lima-edge"
    tables = fabric.running.db.open_registry()
    try:
        assert tables.rows() == []
    finally:
        tables.close()
    assert "deregistered" in point.log.read_text()
    roster = fabric.running.roster
    assert roster is not None
    assert (roster.events["deregistered"], roster.events["expired"]) == (1, 0)


def test_a_point_that_stops_heartbeating_expires(quick_fabric: Fabric, tmp_path: Path) -> None:
    fabric = quick_fabric
    point = Point(tmp_path, "lima-2", fabric.url)
    try:
        _wait(lambda: _points(fabric).get("lima-2") == ("registered", True), "lima-2 up")
        point.proc.send_signal(signal.SIGKILL)  # no deregistration, no more heartbeats
        point.proc.wait(10)
        key = fabric.keys["demo-latam"]
        assert [_chat(fabric.running.port, key) for _ in range(5)] == [(200, "lima-edge")] * 5
        _wait(lambda: "lima-2" not in _points(fabric), "lima-2 expired")
        roster = fabric.running.roster
        assert roster is not None
        assert (roster.events["expired"], roster.events["deregistered"]) == (1, 0)
        assert _chat(fabric.running.port, key) == (200, "lima-edge")
    finally:
        point.stop()


def test_two_gateways_on_postgres_share_the_registry(tmp_path: Path, pg_schema: str) -> None:
    admin = "grf-0badc0de-admin-key-for-the-registry-test-000000000"
    user = "grf-0badc0de-user-key-for-the-registry-test-0000000000"
    env = os.environ | {"GRIFO_TEST_ADMIN": admin, "GRIFO_TEST_USER": user, "PERU": PERU}
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
gateway:
  health_interval_s: 0.2
  store: {{postgres_url: "{POSTGRES_URL}", postgres_schema: {pg_schema}}}
  registry:
    heartbeat_s: 0.5
    tokens: [{{id: peru, env: PERU, jurisdictions: [PE]}}]
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {{kind: fake, embeddings: fake}}}}
tenants: [{{name: acme, allowed_jurisdictions: [PE]}}]
keys:
  - {{id: acme-1, tenant: acme, env: GRIFO_TEST_USER}}
  - {{id: ops, tenant: acme, role: admin, env: GRIFO_TEST_ADMIN}}
"""
    )
    gateways = [serve(config, tmp_path / f"gw{n}", env) for n in range(2)]
    (_, first), (_, second) = gateways
    point = None
    try:
        point = Point(tmp_path, "lima-2", f"http://127.0.0.1:{first}")

        def listed(port: int) -> dict[str, Any]:
            status, answer = _call(port, "GET", "/admin/points", token=admin)
            assert status == 200, answer
            return {p["name"]: p for p in answer["data"]}

        _wait(lambda: listed(second).get("lima-2", {}).get("state") == "up", "lima-2 at gw 2")
        row = listed(second)["lima-2"]
        assert (row["source"], row["jurisdiction"]) == ("registered", "PE")
        assert row["last_heartbeat_ms"] > 0
        assert _chat(second, user) == (200, "lima-2")
        # Drain while the other gateway, which learns of it from the store, sends traffic.
        results: list[tuple[int, str | None]] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                results.append(_chat(second, user))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            point.proc.send_signal(signal.SIGTERM)
            for port in (first, second):
                _wait(lambda port=port: "lima-2" not in listed(port), "lima-2 gone")
            assert point.proc.wait(30) == 0
        finally:
            done.set()
            worker.join(30)
        assert [r for r in results if r[0] != 200] == [], "a request failed during the drain"
        assert _chat(second, user) == (200, "lima-edge")
    finally:
        if point is not None:
            point.stop()
        for proc, _ in gateways:
            proc.terminate()
        for proc, _ in gateways:
            assert proc.wait(30) == 0
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture(params=["sqlite", "postgres"])
def tables(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryTables]:
    if request.param == "sqlite":
        db: StateDB | PostgresDB = StateDB(tmp_path / "grifo.db")
    else:
        db = PostgresDB(POSTGRES_URL, request.getfixturevalue("pg_schema"))
    registry = db.open_registry()
    yield registry
    registry.close()
    db.close()


def test_the_store_keeps_a_live_name_for_its_token(tables: RegistryTables) -> None:
    assert tables.register("lima-2", "peru", "{}", "127.0.0.1", 60_000)
    assert not tables.register("lima-2", "andes", "{}", "127.0.0.1", 60_000)
    assert tables.register("lima-2", "peru", '{"v": 2}', "127.0.0.1", 60_000)
    assert tables.heartbeat("lima-2", "peru", '{"queued": 1}', 60_000)
    assert not tables.heartbeat("lima-2", "andes", "{}", 60_000)
    [row] = tables.rows()
    assert (row.name, row.token_id, row.identity, row.signals) == (
        "lima-2",
        "peru",
        '{"v": 2}',
        '{"queued": 1}',
    )
    assert 0 <= row.age_ms < 60_000
    time.sleep(0.05)
    # Expired (by the database's clock): no heartbeat, and another token may take the name.
    assert not tables.heartbeat("lima-2", "peru", "{}", 10)
    assert tables.register("lima-2", "andes", "{}", "127.0.0.1", 10)
    assert not tables.deregister("lima-2", "peru")
    assert tables.deregister("lima-2", "andes")
    assert tables.rows() == []
    assert tables.register("lima-3", "peru", "{}", "127.0.0.1", 60_000)
    time.sleep(0.05)
    assert tables.sweep(10) == 1
    assert tables.rows() == []


@pytest.mark.parametrize(
    ("registry", "needle"),
    [
        ("{tokens: [{id: a, jurisdictions: [PE]}]}", "$.gateway.registry.tokens[0]: give exactly"),
        ("{tokens: [{id: a, env: NOPE_UNSET_9, jurisdictions: [PE]}]}", "tokens[0].env"),
        (f'{{tokens: [{{id: a, sha256: "{ZEROS}", jurisdictions: [XX]}}]}}', "jurisdictions"),
        (
            f'{{tokens: [{{id: a, sha256: "{ZEROS}", jurisdictions: [PE], name_pattern: "("}}]}}',
            "tokens[0].name_pattern",
        ),
        ("{heartbeat_s: 5, expire_after_s: 5}", "$.gateway.registry.expire_after_s"),
        ("{tokens: [{id: a, sha256: nothex, jurisdictions: [PE]}]}", "sha256"),
    ],
)
def test_registry_config_names_the_field(registry: str, needle: str) -> None:
    from grifo.config.load import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(f"gateway: {{registry: {registry}}}\npoints: []\n", "x.yaml")
    assert needle in str(info.value)


def test_a_gateway_with_a_registry_needs_no_configured_point() -> None:
    from grifo.config.load import ConfigError, parse_config

    assert parse_config("gateway: {registry: {}}\npoints: []\n", "x").points == []
    with pytest.raises(ConfigError, match=r"\$\.points"):
        parse_config("points: []\n", "x")
