"""`grifo serve` as a user runs it: three SmolLM2 points, demo keys, a factual question, SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.engine

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def _read_banner(proc: subprocess.Popen[str], timeout_s: float = 120) -> tuple[int, dict[str, int]]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    gateway_port, points = 0, {}
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.match(r"grifo gateway on http://127\.0\.0\.1:(\d+)/v1", line):
            gateway_port = int(m.group(1))
        elif m := re.match(r"\s+point (\S+)\s+\S+\s+\S+\s+http://127\.0\.0\.1:(\d+)\s+ready", line):
            points[m.group(1)] = int(m.group(2))
        elif "demo-global" in line:
            return gateway_port, points
    raise AssertionError("grifo serve did not print its banner")


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_grifo_serve_runs_the_demo_fabric(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "grifo", "serve", "--port", "0", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port, points = _read_banner(proc)
        assert set(points) == {"lima-edge", "frankfurt-regional", "virginia-central"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        keys = json.loads((tmp_path / "demo-keys.json").read_text())
        assert set(keys) == {"demo-eu", "demo-latam", "demo-global"}
        answers = {}
        for tenant in ("demo-eu", "demo-latam"):
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[tenant], max_retries=0
            ) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="smollm2-135m-instruct",
                    messages=[
                        SYSTEM,
                        {"role": "user", "content": "What is the capital of France?"},
                    ],
                    temperature=0,
                    max_tokens=16,
                )
                answers[tenant] = (raw.headers["x-grifo-point"], raw.parse())
        assert answers["demo-eu"][0] == "frankfurt-regional"
        assert answers["demo-latam"][0] == "lima-edge"
        for _, chat in answers.values():
            assert "Paris" in (chat.choices[0].message.content or "")
            assert chat.usage is not None
            assert chat.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0
    deadline = time.monotonic() + 10
    while not all(_refuses(p) for p in points.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_refuses(p) for p in points.values()), "a point outlived grifo serve"
