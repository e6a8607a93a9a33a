"""The misbehaving points of tests/support/faulty.py do what their modes say, seen from raw
clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.fabric import CHAT
from tests.support.faulty import FaultyPoint, fixture_faulty_points  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
Make = Callable[..., FaultyPoint]


def post(
    point: FaultyPoint, path: str, body: dict[str, object]
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        point.url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def raw(
    port: int, method: str, path: str, body: bytes = b"", read_s: float = 0.3
) -> tuple[bytes, str]:
    """Send one request and read for up to `read_s`: the bytes and how it ended (eof, reset,
    or still open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data, deadline = b"", time.monotonic() + read_s
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return data, "reset"
            if not piece:
                return data, "eof"
            data += piece
        return data, "open"


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """A chunked body's payload so far, and whether its last chunk arrived."""
    out = b""
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            return out, True
        out += rest[:size]
        body = rest[size + 2 :]
    return out, False


def ask(stream: bool, usage: bool = False) -> bytes:
    body: dict[str, object] = {"model": CHAT, "messages": [{"role": "user", "content": "x"}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": usage}
    return json.dumps(body).encode()


def events(payload: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in payload.decode().split("\n\n") if e]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_ok_answers_whole_and_streamed(faulty_points: Make, path: str) -> None:
    point = faulty_points("ok-lima", mode="ok")
    status, headers, body = post(point, path, json.loads(ask(False)))
    assert status == 200
    assert (headers["x-grifo-point"], headers["x-grifo-jurisdiction"]) == ("ok-lima", "PE")
    answer = json.loads(body)
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + 5
    assert answer["choices"][0]["finish_reason"] == "stop"

    for usage in (True, False):
        status, headers, body = post(point, path, json.loads(ask(True, usage)))
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        frames = events(body)
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(f) for f in frames[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "stop"
        assert finishes.count("stop") == 1
        assert ("usage" in chunks[-1]) is usage
    assert point.inference_requests == 3


def test_error_is_a_500_with_an_openai_error(faulty_points: Make) -> None:
    point = faulty_points("bad-lima", "DE")
    for stream in (False, True):
        status, headers, body = post(point, "/v1/chat/completions", json.loads(ask(stream)))
        assert status == 500
        assert headers["x-grifo-jurisdiction"] == "DE"
        assert json.loads(body)["error"]["type"] == "server_error"
    status, _, body = post(point, "/v1/completions", json.loads(ask(False)))
    assert status == 500
    assert point.inference_requests == 3
    with urllib.request.urlopen(point.url + "/health", timeout=1) as resp:
        health = json.loads(resp.read())
    assert (health["name"], health["jurisdiction"]) == ("bad-lima", "DE")
    assert [m["id"] for m in health["models"]] == [CHAT]


def test_hang_never_answers_but_probes_do_until_told(faulty_points: Make) -> None:
    point = faulty_points(mode="hang")
    data, end = raw(point.port, "POST", "/v1/chat/completions", ask(True), read_s=0.2)
    assert (data, end) == (b"", "open")
    data, end = raw(point.port, "GET", "/load")
    assert data.startswith(b"HTTP/1.1 200 ")
    assert end == "eof"
    point.health_ok = False
    data, end = raw(point.port, "GET", "/health", read_s=0.2)
    assert (data, end) == (b"", "open")
    assert point.inference_requests == 1


@pytest.mark.parametrize("mode", ["hang", "trickle"])
def test_an_unfinished_answer_is_dropped_when_the_point_closes(mode: str) -> None:
    point = FaultyPoint("slow-lima", mode=mode)
    with socket.create_connection(("127.0.0.1", point.port), timeout=2) as sock:
        body = ask(False)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%b"
            % (len(body), body)
        )
        time.sleep(0.05)
        started = time.monotonic()
        point.close()
        data = b""
        while piece := sock.recv(1024):
            data += piece
    assert time.monotonic() - started < 1
    _, _, chunked = data.partition(b"\r\n\r\n")
    assert not dechunk(chunked)[1], "closing must not complete the answer"
    assert data.startswith(b"HTTP/1.1 200 ") if mode == "trickle" else data == b""


@pytest.mark.parametrize("stream", [False, True])
def test_trickle_sends_a_head_then_a_byte_every_200ms(faulty_points: Make, stream: bool) -> None:
    point = faulty_points(mode="trickle")
    data, end = raw(point.port, "POST", "/v1/completions", ask(stream), read_s=0.5)
    assert end == "open"
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"x-grifo-point: bad-lima" in head
    payload, finished = dechunk(body)
    assert not finished
    assert 2 <= len(payload) <= 4  # at 0, 0.2 and 0.4 s
    assert payload == (b"data:"[: len(payload)] if stream else b'{"id"'[: len(payload)])


def test_die_after_head_cuts_a_stream_after_its_role_chunk(faulty_points: Make) -> None:
    point = faulty_points(mode="die_after_head")
    data, end = raw(point.port, "POST", "/v1/chat/completions", ask(True, True), read_s=1)
    assert end in ("eof", "reset")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    payload, finished = dechunk(body)
    assert not finished
    (only,) = events(payload)
    assert json.loads(only)["choices"][0]["delta"]["role"] == "assistant"

    data, end = raw(point.port, "POST", "/v1/completions", ask(False), read_s=1)
    assert data == b""
    assert end in ("eof", "reset")
    point.mode = "ok"  # the mode changes at run time
    status, _, _ = post(point, "/v1/completions", json.loads(ask(False)))
    assert status == 200
    assert point.inference_requests == 3


def test_runs_as_a_process_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.faulty", "--name", "proc-lima", "--mode", "error"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "listening"
        with urllib.request.urlopen(f"http://127.0.0.1:{line['port']}/health", timeout=2) as resp:
            assert json.loads(resp.read())["name"] == "proc-lima"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
