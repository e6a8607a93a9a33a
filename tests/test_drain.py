"""Graceful drain: SIGTERM stops new work and lets the streams in flight finish."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from pathlib import Path

from tests.support.fabric import CHAT, topology_yaml
from tests.support.processes import serve


def test_sigterm_finishes_streams_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml("{kind: fake, embeddings: fake, token_delay_ms: 80}"))
    proc, port = serve(config, tmp_path / "state")
    try:
        key = json.loads((tmp_path / "state" / "demo-keys.json").read_text())["demo-global"]
        words = " ".join(f"w{i}" for i in range(40))  # echoed one word per 80 ms: ~3.2 s
        body = json.dumps(
            {"model": CHAT, "messages": [{"role": "user", "content": words}], "stream": True}
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        first = response.readline()
        assert first.startswith(b"data:") or first.strip() == b"", first
        proc.send_signal(signal.SIGTERM)  # mid-stream
        # Well before the stream can end, so the gateway is still there, draining it.
        refused = False
        deadline = time.monotonic() + 1.5
        while not refused and time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(2)
                refused = probe.connect_ex(("127.0.0.1", port)) != 0
            time.sleep(0.05)
        rest = response.read().decode()
        conn.close()
        assert "data: [DONE]" in rest, "the stream in flight was cut"
        assert "w39" in rest
        assert refused, "a draining gateway must not take new connections"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
