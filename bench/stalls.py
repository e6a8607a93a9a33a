"""Event-loop stalls under load, for two trees side by side: how often, and how long, the
gateway's loop could not run a 1 ms timer on time.

Each tree's gateway (the `overhead.py` setup, CPU 1) serves 32 concurrent streams and then wrk
at c=64; a probe inside it (installed from `bench/stall_probe/sitecustomize.py`, nothing in
grifo itself) sleeps 1 ms in a loop and reports each wake-up more than 4 ms late. A busy loop
is late by its turn's work (64 requests in a turn at c=64); a stall well beyond that is
something else holding the loop, such as a garbage collection. The trees take turns.

Usage: python bench/stalls.py A [B] [--rounds 2] [--seconds 6]   (A, B as in `ab.py`)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ab import add_revisions, checkouts
from compare import stream_load
from overhead import CONFIG, GATEWAY_PORT, KEY, LUA, run_wrk, start_mock, wait_http

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "stall_probe"


def measure(tree: Path, seconds: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="grifo-stalls-"))
    (work / "bench.yaml").write_text(CONFIG)
    (work / "post.lua").write_text(LUA)
    late = work / "late.txt"
    env = {
        **os.environ,
        "GRIFO_BENCH_KEY": KEY,
        "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(PROBE)]),
        "GRIFO_STALL_PROBE": str(late),
    }
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "grifo", "serve"]
    cmd += ["--config", str(work / "bench.yaml"), "--state-dir", str(work / "state")]
    gateway = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{GATEWAY_PORT}/readyz", process=gateway)
        streams = asyncio.run(stream_load(GATEWAY_PORT, KEY, seconds))
        url = f"http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions"
        whole = run_wrk(url, 64, seconds, work / "post.lua")
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)
    stalls = sorted((float(x) for x in late.read_text().split()), reverse=True)
    return {
        "ttft_p99_ms": streams["ttft_p99_ms"] or 0.0,
        "rps": whole["rps"],
        "p99_ms": whole["p99_ms"],
        "over_8ms": sum(1 for s in stalls if s > 8),
        "over_16ms": sum(1 for s in stalls if s > 16),
        "worst_ms": stalls[0] if stalls else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    add_revisions(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})  # the streaming client shares CPU 0 with wrk and the mock
    work = Path(tempfile.mkdtemp(prefix="grifo-stalls-"))
    rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with checkouts(args.a, args.b, work) as trees:
        mock = start_mock()
        try:
            for round_ in range(args.rounds):
                for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                    rows[name].append(measure(trees[name], args.seconds))
        finally:
            mock.send_signal(signal.SIGTERM)
            mock.wait(timeout=10)
    each = f"{args.seconds} s of 32 streams, then {args.seconds} s of wrk"
    print(f"event-loop stalls, {args.rounds} rounds of {each}")
    print()
    print(
        "| tree | stalls > 8 ms | > 16 ms | worst ms | stream TTFT p99 ms | c=64 req/s "
        "| c=64 p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rev in (("A", args.a), ("B", args.b)):
        r = rows[name]
        label = "working tree" if rev == str(ROOT) else rev
        print(
            f"| {name} {label} | {sum(x['over_8ms'] for x in r):.0f} "
            f"| {sum(x['over_16ms'] for x in r):.0f} | {max(x['worst_ms'] for x in r):.1f} "
            f"| {statistics.median(x['ttft_p99_ms'] for x in r):.2f} "
            f"| {statistics.median(x['rps'] for x in r):,.0f} "
            f"| {statistics.median(x['p99_ms'] for x in r):.1f} |"
        )


if __name__ == "__main__":
    main()
