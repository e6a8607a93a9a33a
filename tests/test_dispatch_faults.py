"""Points that hang, trickle or die before the first token: the client never notices.

Until a client has received a byte, a failed attempt moves to the next compliant point
(`dispatch.try_timeout_s` bounds a silent one); a late one can be hedged instead.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from grifo.telemetry.fabric import point_states
from tests.support.fabric import CHAT, Fabric
from tests.support.faulty import FaultyPoint

HELLO = [{"role": "user", "content": "hello there"}]


def _topology(bad: FaultyPoint, gateway: str) -> str:
    return f"""
gateway: {{demo_keys: true, health_interval_s: 0.2, {gateway}}}
points:
  - {{name: bad, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 1,
     url: "{bad.url}"}}
  - {{name: good, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 40,
     engine: {{kind: fake, embeddings: fake}}}}
  - {{name: frankfurt, site: fra, region: eu, jurisdiction: DE, tier: edge, rtt_ms: 0,
     engine: {{kind: fake, embeddings: fake}}}}
tenants:
  - {{name: demo-peru, allowed_jurisdictions: [PE]}}
"""


@pytest.fixture
def bad() -> Iterator[FaultyPoint]:
    with FaultyPoint("bad", mode="ok") as point:
        yield point


def _post(fab: Fabric, stream: bool, **headers: str) -> tuple[http.client.HTTPResponse, str]:
    """One chat request; the response and its body (a stream read to the end)."""
    body = {"model": CHAT, "messages": HELLO, "stream": stream, "max_tokens": 8}
    conn = http.client.HTTPConnection("127.0.0.1", fab.running.port, timeout=20)
    auth = {"authorization": f"Bearer {fab.keys['demo-peru']}", **headers}
    auth["content-type"] = "application/json"
    conn.request("POST", "/v1/chat/completions", json.dumps(body), auth)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp, text


def _content(stream: bool, text: str) -> str:
    if not stream:
        return str(json.loads(text)["choices"][0]["message"]["content"])
    assert '"error"' not in text, text
    assert "data: [DONE]" in text
    assert text.count('"role"') == 1, "the point's role chunk was sent twice"
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.mark.parametrize("mode", ["hang", "trickle"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_silent_or_trickling_point_is_left_for_the_next_and_ejected(
    bad: FaultyPoint, tmp_path: Path, mode: str, stream: bool
) -> None:
    gateway = "dispatch: {try_timeout_s: 0.4}, ejection: {consecutive_failures: 2, base_s: 60}"
    fab = Fabric.from_yaml(_topology(bad, gateway), tmp_path)
    try:
        resp, _ = _post(fab, stream)
        assert resp.getheader("x-grifo-point") == "bad"  # preferred while it answers
        bad.mode = mode  # type: ignore[assignment]
        tried = []
        for _ in range(4):
            resp, text = _post(fab, stream)
            assert resp.status == 200, text
            assert resp.getheader("x-grifo-point") == "good"
            assert _content(stream, text) == "hello there"  # the fake engine's echo
            tried.append(resp.getheader("x-grifo-tried"))
            if len(tried) == 1:
                first_retried = resp.getheader("x-request-id") or ""
        assert tried == ["bad:timeout", "bad:timeout", None, None]  # ejected after two
        assert fab.audit_record(resp.getheader("x-request-id") or "").tried == []
        assert fab.audit_record(first_retried).tried == ["bad:PE:timeout"]
        assert bad.inference_requests == 3
        gateway_state = fab.running.gateway
        assert not next(p for p in gateway_state.points if p.name == "bad").healthy
        assert gateway_state.dispatcher.counts.retries == {"timeout": 2}
        states = {p["name"]: p for p in point_states(gateway_state)}
        assert states["bad"]["state"] == "ejected"
        assert states["bad"]["times_ejected"] == 1
        assert states["good"]["state"] == "up"
        with urllib.request.urlopen(f"{fab.url}/metrics", timeout=5) as scrape:
            metrics = scrape.read().decode()
        assert 'grifo_point_ejected{point="bad"} 1.0' in metrics
        assert 'grifo_point_ejected{point="good"} 0.0' in metrics
        assert 'grifo_dispatch_retries_total{reason="timeout"} 2.0' in metrics
        assert 'grifo_placement_decisions_total{reason="retried"} 2.0' in metrics
        assert 'grifo_placement_decisions_total{reason="best_score"} 1.0' in metrics  # the first
        assert 'grifo_placement_decisions_total{reason="only_compliant"} 2.0' in metrics  # ejected
        ledger = [e for e in fab.running.db.ledger() if e.point != "bad"]
        assert {e.point for e in ledger} == {"good"}  # the abandoned attempts bill nothing
    finally:
        fab.close()


def test_a_stream_whose_point_dies_before_its_first_token_completes_elsewhere(
    bad: FaultyPoint, tmp_path: Path
) -> None:
    fab = Fabric.from_yaml(_topology(bad, "ejection: {consecutive_failures: 5}"), tmp_path)
    try:
        bad.mode = "die_after_head"
        resp, text = _post(fab, True)
        assert resp.status == 200
        assert resp.getheader("x-grifo-point") == "good"
        assert resp.getheader("x-grifo-tried") == "bad:broken"
        assert _content(True, text) == "hello there"
    finally:
        fab.close()


def test_a_late_point_is_hedged_and_only_the_winner_is_billed(
    bad: FaultyPoint, tmp_path: Path
) -> None:
    gateway = "dispatch: {hedge_tiers: [edge], hedge_initial_delay_ms: 100}"
    fab = Fabric.from_yaml(_topology(bad, gateway), tmp_path)
    try:
        bad.mode = "hang"
        started = time.monotonic()
        resp, text = _post(fab, False, **{"x-grifo-tier": "edge", "x-request-id": "h"})
        elapsed = time.monotonic() - started
        assert resp.status == 200, text
        assert resp.getheader("x-grifo-point") == "good"
        assert resp.getheader("x-grifo-tried") == "bad:hedge-lost"
        assert 0.1 <= elapsed < 5
        counts = fab.running.gateway.dispatcher.counts.hedges
        assert counts["sent"] == 1
        assert counts["won"] == 1
        request_id = resp.getheader("x-request-id")
        assert [e.point for e in fab.ledger(request_id).values()] == ["good"]
        assert fab.audit_record(request_id).tried == ["bad:PE:hedge-lost"]
        # Without hedging (tier any) the same request waits on the silent point until its
        # deadline: the hedge is what answered above.
        resp, _ = _post(fab, False, **{"x-grifo-tier": "any", "x-grifo-timeout-ms": "600"})
        assert resp.status == 504
    finally:
        fab.close()


def test_an_ejected_point_comes_back_half_open_and_one_failure_sends_it_out(
    bad: FaultyPoint, tmp_path: Path
) -> None:
    gateway = "ejection: {consecutive_failures: 3, base_s: 0.3}"
    fab = Fabric.from_yaml(_topology(bad, gateway), tmp_path)
    try:
        bad.mode = "error"
        tried = [_post(fab, False)[0].getheader("x-grifo-tried") for _ in range(4)]
        assert tried == ["bad:500", "bad:500", "bad:500", None]  # out after three in a row
        state = next(p for p in fab.running.gateway.points if p.name == "bad")
        deadline = time.monotonic() + 5
        while not state.healthy and time.monotonic() < deadline:
            time.sleep(0.02)  # the ejection ends and a probe lets it back, on probation
        assert state.probation
        tried = [_post(fab, False)[0].getheader("x-grifo-tried") for _ in range(2)]
        assert tried == ["bad:500", None], "one failure on probation must eject it again"
        assert state.ejections == 2
        bad.mode = "ok"
        deadline = time.monotonic() + 5
        while not state.healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _post(fab, False)[0].getheader("x-grifo-point") == "bad"
        assert not state.probation  # a good answer ends the probation
    finally:
        fab.close()
