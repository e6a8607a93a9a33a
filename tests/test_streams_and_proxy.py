"""Client disconnects mid-stream, and a point in proxy mode in front of another engine server."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from grifo.audit.signing import public_from_b64, verify_receipt
from tests.support.fabric import CHAT, EMBED, Fabric, topology_yaml

WORDS = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def slow_fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    engine = "{kind: fake, embeddings: fake, token_delay_ms: 20}"
    fab = Fabric.from_yaml(topology_yaml(engine), tmp_path_factory.mktemp("slow"))
    yield fab
    fab.close()


def _load(fab: Fabric, point: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{fab.point_url(point)}/load", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def test_disconnect_mid_stream_bills_what_was_produced_and_cancels(slow_fabric: Fabric) -> None:
    fab = slow_fabric
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": WORDS}],
        "stream": True,
        "max_tokens": 200,
    }
    headers = {"authorization": f"Bearer {fab.keys['demo-eu']}"}
    conn = http.client.HTTPConnection("127.0.0.1", fab.running.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        request_id = response.headers["x-request-id"]
        seen = 0
        while seen < 5:
            if response.readline().startswith(b"data: {"):
                seen += 1
    finally:
        conn.close()  # the client goes away mid-stream
    entry = fab.ledger(request_id)[request_id]
    assert entry.status == "client_closed"
    assert entry.usage_source == "estimated"
    assert entry.prompt_tokens == 201
    assert 4 <= entry.completion_tokens < 200
    assert entry.cost_micros > 0
    deadline = time.monotonic() + 3
    while _load(fab, "frankfurt-regional")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _load(fab, "frankfurt-regional")["in_flight"] == 0, "generation was not cancelled"


def test_concurrent_streams_all_complete_with_their_own_content(slow_fabric: Fabric) -> None:
    import concurrent.futures

    client = slow_fabric.client("demo-global")

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"stream {i} ok"}], stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == [f"stream {i} ok" for i in range(16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def upstream_engine() -> Iterator[str]:
    """A separate OpenAI-compatible server (a grifo point with the fake engine) to proxy to."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grifo",
            "point",
            "--name",
            "engine-box",
            "--jurisdiction",
            "BR",
            "--engine",
            "fake",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_proxy_point_serves_an_existing_engine(upstream_engine: str, tmp_path: Path) -> None:
    proxied = f"""
  - {{name: sao-paulo-edge, site: sao-paulo, region: sa-east, jurisdiction: BR, tier: edge,
     rtt_ms: 1, engine: {{kind: proxy, upstream_url: "{upstream_engine}"}}}}"""
    fab = Fabric.from_yaml(topology_yaml(extra_points=proxied), tmp_path)
    try:
        client = fab.client("demo-latam")
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "via the proxy"}], max_tokens=8
        )
        assert raw.headers["x-grifo-point"] == "sao-paulo-edge"
        assert raw.headers["x-grifo-jurisdiction"] == "BR"
        chat = raw.parse()
        assert chat.choices[0].message.content == "via the proxy"
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 3
        chunks = list(
            client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": "streamed too"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "streamed too"
        )
        assert chunks[-1].usage is not None
        emb = client.embeddings.create(model=EMBED, input="x y")
        assert emb.usage.prompt_tokens == 2
        # The proxy point signs what it processed, whole or streamed: the audit record holds
        # its receipt, verified with the key the point published, naming it and its tokens.
        with client.chat.completions.with_streaming_response.create(
            model=CHAT,
            messages=[{"role": "user", "content": "signed stream"}],
            stream=True,
        ) as streamed:
            stream_id = streamed.headers["x-request-id"]
            list(streamed.iter_lines())
        whole_id = raw.headers["x-request-id"]
        point = next(p for p in fab.running.gateway.points if p.name == "sao-paulo-edge")
        assert point.public_key is not None
        for request_id, completion in ((whole_id, 3), (stream_id, 2)):
            record = fab.audit_record(request_id)
            receipt = verify_receipt(record.point_receipt, public_from_b64(point.public_key))
            assert (receipt.request_id, receipt.point, receipt.jurisdiction) == (
                request_id, "sao-paulo-edge", "BR"
            )  # fmt: skip
            assert receipt.completion_tokens == completion == record.completion_tokens
    finally:
        fab.close()
