"""Instructions per request of the whole gateway, sockets included, for two source trees.

`pipeline.py --instructions` counts the pipeline alone, called in process: it leaves out the
HTTP server, the pooled client and their parsing, which are a quarter of what a request costs
under load. Here each tree's `grifo serve` (the `overhead.py` setup) runs under valgrind
(callgrind) against `mock_point.py`; a client in this process sends requests over
`--connections` keep-alive connections at once (a few in flight, as under load), first a
warm-up, then the counters are zeroed (`callgrind_control -z`), `--requests` more are sent and
the counters dumped (`-d`): user-space instructions per request, all of the gateway's threads.
Counts are not time (no cache misses, no kernel), but they hold still where this VM's
timings drift: confirm a change that counts fewer under wrk (`ab.py`) before calling it faster.
A tree takes ~30 s a round (one run of two trees took 56 s; start-up under valgrind is most of it).

Usage: python bench/insitu.py A [B] [--rounds 1] [--requests 800] [--connections 8]
                              [--audit on|off]

A and B as in `ab.py`: git revisions or directories holding `src/grifo` (B defaults to the
working tree). Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ab import add_revisions, checkouts
from overhead import BODY, CONFIG, GATEWAY_PORT, KEY, start_mock, wait_http

WARM_UP = 400


def requests(count: int, connections: int) -> None:
    """`count` chat requests over `connections` keep-alive connections at once; every answer
    must be a 200."""
    raw = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n{BODY}"
    ).encode()
    failures: list[str] = []

    def client(n: int) -> None:
        with socket.create_connection(("127.0.0.1", GATEWAY_PORT), timeout=60) as sock:
            for _ in range(n):
                sock.sendall(raw)
                if (head := _answer(sock)) is not None:
                    failures.append(head)
                    return

    threads = [
        threading.Thread(target=client, args=(count // connections,)) for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"the gateway answered {failures[0]!r}")


def _answer(sock: socket.socket) -> str | None:
    """Read one response; None if it was a 200, else its status line."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return "connection closed"
        data += chunk
        head, found, body = data.partition(b"\r\n\r\n")
        if not found:
            continue
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length is None:
            return head.split(b"\r\n", 1)[0].decode("latin-1")
        if len(body) >= int(length.group(1)):
            status = head.split(b"\r\n", 1)[0]
            return None if status.startswith(b"HTTP/1.1 200") else status.decode("latin-1")


def count(tree: Path, audit: str, requests_n: int, connections: int) -> float:
    """Instructions per request of `tree`'s gateway: one start under callgrind."""
    work = Path(tempfile.mkdtemp(prefix="grifo-insitu-"))
    config = CONFIG
    if audit == "off":
        config = config.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    (work / "bench.yaml").write_text(config)
    env = {
        **os.environ,
        "GRIFO_BENCH_KEY": KEY,
        "PYTHONPATH": str(tree / "src"),
        "PYTHONHASHSEED": "0",
    }
    out = work / "callgrind.out"
    gateway = subprocess.Popen(
        [
            *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
            *(sys.executable, "-m", "grifo", "serve"),
            *("--config", str(work / "bench.yaml"), "--state-dir", str(work / "state")),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{GATEWAY_PORT}/readyz", timeout_s=300, process=gateway)
        requests(WARM_UP, connections)
        _control("-z", gateway.pid)  # zero the counters: the warm-up is not counted
        requests(requests_n, connections)
        _control("-d", gateway.pid)  # dump what the requests cost
        dump = Path(f"{out}.1")
        deadline = time.monotonic() + 30
        while not (dump.exists() and "summary:" in dump.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise RuntimeError("callgrind wrote no dump")
            time.sleep(0.2)
        summary = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M)
        assert summary is not None
        return int(summary.group(1)) / (requests_n // connections * connections)
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(timeout=60)
        except subprocess.TimeoutExpired:
            gateway.kill()
        shutil.rmtree(work, ignore_errors=True)


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_revisions(parser)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--audit", choices=["on", "off"], default="on")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is missing: apt-get install valgrind")
    work = Path(tempfile.mkdtemp(prefix="grifo-insitu-"))
    results: dict[str, list[float]] = {"A": [], "B": []}
    with checkouts(args.a, args.b, work) as trees:
        mock = start_mock()
        try:
            for round_ in range(args.rounds):
                for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                    n = count(trees[name], args.audit, args.requests, args.connections)
                    results[name].append(n)
                    print(f"round {round_ + 1}, {name}: {n / 1000:.1f} k instructions/request")
        finally:
            mock.send_signal(signal.SIGTERM)
            mock.wait(timeout=10)
    a, b = (statistics.median(results[name]) for name in ("A", "B"))
    ratio = statistics.median(y / x for x, y in zip(results["A"], results["B"], strict=True))
    b_name = "working tree" if args.b == str(Path(__file__).resolve().parent.parent) else args.b
    print(
        f"\ngateway instructions per request, audit {args.audit}, {args.requests} requests over "
        f"{args.connections} connections, {args.rounds} rounds, "
        f"{time.strftime('%Y-%m-%d %H:%M')}: A {args.a}, B {b_name}\n"
    )
    print("| measure | A k instructions/request | B | B/A |")
    print("|---|---:|---:|---:|")
    print(f"| gateway, all threads | {a / 1000:.1f} | {b / 1000:.1f} | x{ratio:.3f} |")


if __name__ == "__main__":
    main()
