"""Graceful drain: SIGTERM stops new work and lets the streams in flight finish."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.fabric import CHAT, topology_yaml


def test_sigterm_finishes_streams_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml("{kind: fake, embeddings: fake, token_delay_ms: 40}"))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "grifo", "serve", "--config", str(config)),
            *("--port", "0", "--state-dir", str(tmp_path / "state")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        match = re.search(r":(\d+)/v1", proc.stdout.readline())
        assert match, "grifo serve did not start"
        port = int(match.group(1))
        key = json.loads((tmp_path / "state" / "demo-keys.json").read_text())["demo-global"]
        words = " ".join(f"w{i}" for i in range(25))  # echoed one word per 40 ms: ~1 s
        body = json.dumps(
            {"model": CHAT, "messages": [{"role": "user", "content": words}], "stream": True}
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        first = response.readline()
        assert first.startswith(b"data:") or first.strip() == b"", first
        proc.send_signal(signal.SIGTERM)  # mid-stream
        refused = False
        deadline = time.monotonic() + 3
        while not refused and time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(2)
                refused = probe.connect_ex(("127.0.0.1", port)) != 0
            time.sleep(0.05)
        rest = response.read().decode()
        conn.close()
        assert "data: [DONE]" in rest, "the stream in flight was cut"
        assert rest.count("w2") >= 1
        assert refused, "a draining gateway must not take new connections"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
