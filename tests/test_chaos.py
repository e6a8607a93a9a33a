"""Chaos with real processes on loopback: `grifo serve` in front of `grifo point` processes that
are killed with SIGKILL mid-stream or restarted one after another under load."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.fabric import CHAT
from tests.support.processes import serve

NAMES = ("lima-a", "lima-b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Chaos:
    tmp: Path
    token_delay_ms: int
    ports: dict[str, int] = field(default_factory=dict)
    points: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    gateway: subprocess.Popen[str] | None = None
    port: int = 0
    key: str = ""

    def topology(self, running: bool) -> str:
        """The gateway's view (`running`: points by URL) or the points' own (their engine)."""
        engine = f"{{kind: fake, embeddings: fake, token_delay_ms: {self.token_delay_ms}}}"
        rows = "\n".join(
            f"  - {{name: {name}, site: lima, region: sa-west, jurisdiction: PE, tier: edge, "
            f"rtt_ms: {1 + 10 * i}, "
            + (
                f'url: "http://127.0.0.1:{self.ports[name]}"}}'
                if running
                else f"engine: {engine}}}"
            )
            for i, name in enumerate(NAMES)
        )
        return (
            "gateway: {demo_keys: true, health_interval_s: 0.2}\n"
            f"points:\n{rows}\ntenants:\n  - {{name: demo-peru, allowed_jurisdictions: [PE]}}\n"
        )

    def start_point(self, name: str) -> None:
        config, key = str(self.tmp / "points.yaml"), str(self.tmp / f"{name}.pem")
        argv = ["grifo", "point", "--config", config, "--name", name, "--key-file", key]
        self.points[name] = subprocess.Popen(
            [sys.executable, "-m", *argv, "--port", str(self.ports[name])],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = self.points[name].stdout.readline()  # type: ignore[union-attr]
        assert b"listening" in line, f"point {name} did not start"

    def start(self) -> None:
        self.ports = {name: _free_port() for name in NAMES}
        (self.tmp / "grifo.yaml").write_text(self.topology(running=True))
        (self.tmp / "points.yaml").write_text(self.topology(running=False))
        for name in NAMES:
            self.start_point(name)
        self.gateway, self.port = serve(self.tmp / "grifo.yaml", self.tmp / "state")
        keys = json.loads((self.tmp / "state" / "demo-keys.json").read_text())
        self.key = keys["demo-peru"]

    def stop(self) -> None:
        for proc in [*self.points.values(), self.gateway]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()

    def wait_healthy(self, name: str) -> None:
        """Until the gateway routes to `name` again (/readyz: every point healthy)."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/readyz")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"the gateway never saw {name} healthy again")

    def send(self, stream: bool, words: int = 4) -> http.client.HTTPConnection:
        """Send a chat request; `getresponse()` on the connection waits for its head."""
        text = " ".join(f"w{i}" for i in range(words))
        body = {"model": CHAT, "messages": [{"role": "user", "content": text}], "stream": stream}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        return conn

    def request(self, stream: bool, words: int = 4) -> tuple[int, dict[str, str], str]:
        conn = self.send(stream, words)
        try:
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode()
        finally:
            conn.close()

    def ledger(self, request_id: str) -> dict[str, object]:
        db = sqlite3.connect(self.tmp / "state" / "grifo.db")
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                db.row_factory = sqlite3.Row
                row = db.execute("SELECT * FROM ledger WHERE request_id = ?", (request_id,))
                if (found := row.fetchone()) is not None:
                    return dict(found)
                time.sleep(0.05)
        finally:
            db.close()
        raise AssertionError(f"no ledger entry for {request_id}")


@pytest.fixture
def chaos(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chaos]:
    fabric = Chaos(tmp_path, getattr(request, "param", 150))
    fabric.start()
    yield fabric
    fabric.stop()


def _content(text: str) -> str:
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    return "".join(d.get("content") or "" for d in deltas)


def test_kill_9_before_the_first_token_completes_on_another_point(chaos: Chaos) -> None:
    conn = chaos.send(stream=True)  # lima-a needs 150 ms for its first token...
    time.sleep(0.05)
    chaos.points["lima-a"].kill()  # ... and dies before it
    chaos.points["lima-a"].wait(10)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 200
    assert response.getheader("x-grifo-point") == "lima-b"
    assert response.getheader("x-grifo-tried") == "lima-a:broken"
    assert '"error"' not in text
    assert "data: [DONE]" in text
    assert _content(text) == "w0 w1 w2 w3"


def test_kill_9_mid_stream_ends_it_in_band_and_bills_what_was_produced(chaos: Chaos) -> None:
    conn = chaos.send(stream=True, words=20)
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("x-grifo-point") == "lima-a"
    request_id = response.getheader("x-request-id")
    assert request_id
    seen = b""
    while _content(seen.decode()).count("w") < 3:
        seen += response.readline()
    chaos.points["lima-a"].send_signal(signal.SIGKILL)
    rest = response.read().decode()
    conn.close()
    assert '"error"' in rest, "the stream must end with an in-band error event"
    assert "data: [DONE]" not in rest
    produced = len(_content(seen.decode() + rest).split())
    assert 3 <= produced < 20
    entry = chaos.ledger(request_id)
    assert entry["point"] == "lima-a"
    assert entry["status"] == "point_failed"
    assert entry["usage_source"] == "estimated"
    assert entry["completion_tokens"] == produced
    assert int(str(entry["cost_micros"])) >= 0


@pytest.mark.parametrize("chaos", [5], indirect=True)
def test_rolling_restart_of_every_point_under_load_fails_no_request(chaos: Chaos) -> None:
    stop = threading.Event()
    outcomes: list[tuple[bool, int, str]] = []

    def client(stream: bool) -> None:
        while not stop.is_set():
            try:
                status, _, text = chaos.request(stream)
                answered = "data: [DONE]" in text if stream else "w3" in text
                ok = status == 200 and answered and '"error"' not in text
                outcomes.append((ok, status, text[-200:]))
            except OSError as exc:
                outcomes.append((False, 0, repr(exc)))

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for name in NAMES:
            point = chaos.points[name]
            point.send_signal(signal.SIGTERM)
            assert point.wait(20) == 0, f"{name} did not drain cleanly"
            assert point.stdout is not None
            point.stdout.close()
            chaos.start_point(name)
            chaos.wait_healthy(name)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    failed = [o for o in outcomes if not o[0]]
    assert len(outcomes) > 20
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:3]}"
