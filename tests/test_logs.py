"""Log lines: text or JSON, with the request id, never a stack trace or a key."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

from grifo.telemetry.logs import REQUEST_ID, JsonFormatter, TextFormatter

KEY = "grf-1a2b3c4d-SuperSecretPartOfTheKey_0123456789"


def _record(message: str, *args: object) -> logging.LogRecord:
    try:
        raise ValueError(f"bad input near {KEY}")
    except ValueError:
        exc_info = sys.exc_info()
    return logging.LogRecord("grifo.api", logging.ERROR, __file__, 1, message, args, exc_info)


def test_both_formats_mask_keys_drop_tracebacks_and_name_the_request() -> None:
    token = REQUEST_ID.set("req-42")
    try:
        record = _record("key %s failed, Authorization: Bearer sk-other-secret", KEY)
        text = TextFormatter().format(record)
        entry = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    for line in (text, json.dumps(entry)):
        assert "SuperSecret" not in line
        assert "sk-other-secret" not in line
        assert "grf-1a2b3c4d-" in line  # the key id part stays, for support
        assert "Traceback" not in line
        assert 'File "' not in line
    assert entry["request_id"] == "req-42"
    assert entry["level"] == "error"
    assert entry["error"].startswith("ValueError: bad input near grf-1a2b3c4d-[masked]")
    assert "request_id=req-42" in text


def test_a_gateway_logs_json_lines_with_the_request_id(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once closed: the point is down
    config = tmp_path / "grifo.yaml"
    config.write_text(
        "gateway: {demo_keys: true, health_interval_s: 0.2}\n"
        "points:\n  - {name: lima, site: lima, region: r, jurisdiction: PE, tier: edge, "
        f'url: "http://127.0.0.1:{dead}"}}\n'
        "tenants:\n  - {name: demo-peru}\n"
    )
    flags = ["--log-format", "json", "--log-level", "info"]
    serve = ["serve", "--config", str(config), "--port", "0", "--state-dir", str(tmp_path / "s")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "grifo", *flags, *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split(":")[2].split("/")[0])
        key = json.loads((tmp_path / "s" / "demo-keys.json").read_text())["demo-peru"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        response.read()
        request_id = response.getheader("x-request-id")
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    lines = [line for line in stderr.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert entries, stderr
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e.get("request_id") == request_id for e in entries), entries
    assert key[13:] not in stderr  # the secret part of a key is never logged
    assert "Traceback" not in stderr
