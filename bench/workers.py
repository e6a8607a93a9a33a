"""Gateway workers: does `grifo serve --workers N` scale with cores?

The CPUs are split in two: the gateway's half (CPUs 0..K-1, K = half of them by default), and
the load half, which holds wrk (a third of it, one thread per CPU) and mock point processes
sharing one port (the rest). For each worker count W (powers of two up to K) the gateway runs
W processes on CPUs 0..W-1 and wrk drives 64 connections per worker, so each worker sees what
the one-core benchmark gives it. A direct run (wrk straight to the mocks, at the largest
connection count) shows what the load half can drive: a gateway row near it is capped by the
rig, not by the gateway. On a 2-CPU host only W=1 fits (gateway on CPU 1, wrk and one mock on
CPU 0, as in `overhead.py`). Full pipeline on, as in `overhead.py`; the workers share one
SQLite state database. Prints a markdown table; writes bench/results/workers-<time>.json.

Usage: python bench/workers.py [--seconds 10] [--gateway-cpus K] [--workers 1,2,4] [--source DIR]
(--source: a checkout whose `src/grifo` the gateway runs instead of this one's, to compare two
revisions on the same host: run the bench once with each, alternately.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from compare import tree, tree_cpu_s
from overhead import CONFIG, GATEWAY_PORT, LUA, MOCK_PORT, ROOT, run_wrk, start_gateway, start_mock

PER_WORKER_CONNECTIONS = 64


def cpu_list(cpus: range) -> str:
    return f"{cpus.start}-{cpus.stop - 1}" if len(cpus) > 1 else str(cpus.start)


def layout(cpus: int, gateway_cpus: int) -> tuple[range, range, range]:
    """(gateway CPUs, wrk CPUs, mock CPUs)."""
    if cpus < 2:
        sys.exit("needs at least 2 CPUs: the gateway gets its own")
    if cpus == 2:
        return range(1, 2), range(1), range(1)
    gateway_cpus = min(gateway_cpus, cpus - 2)
    load = cpus - gateway_cpus
    wrk = max(1, load // 3)
    return (
        range(gateway_cpus),
        range(gateway_cpus, gateway_cpus + wrk),
        range(gateway_cpus + wrk, cpus),
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--gateway-cpus", type=int, default=max(1, cpus // 2))
    parser.add_argument("--workers", default="", help="comma-separated counts (default 1,2,4..)")
    parser.add_argument("--source", type=Path, help="a checkout whose src/grifo to run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    gateway_cpus, wrk_cpus, mock_cpus = layout(cpus, args.gateway_cpus)
    counts = [int(n) for n in args.workers.split(",") if n] or [
        1 << i for i in range(len(gateway_cpus).bit_length()) if 1 << i <= len(gateway_cpus)
    ]
    if max(counts) > len(gateway_cpus):
        sys.exit(f"at most {len(gateway_cpus)} workers fit the gateway's CPUs on this host")
    work = Path(tempfile.mkdtemp(prefix="grifo-workers-"))
    script = work / "post.lua"
    script.write_text(LUA)
    mock_sets = [cpu_list(range(c, c + 1)) for c in mock_cpus]
    mocks = [start_mock(cpus, shared=len(mock_sets) > 1) for cpus in mock_sets]
    wrk_on, threads = cpu_list(wrk_cpus), len(wrk_cpus)
    results: dict[str, dict[str, float]] = {}
    try:
        widest = PER_WORKER_CONNECTIONS * max(counts)
        direct = f"http://127.0.0.1:{MOCK_PORT}/v1/chat/completions"
        results["direct"] = run_wrk(direct, widest, args.seconds, script, wrk_on, threads)
        results["direct"]["connections"] = widest
        for n in counts:
            home = work / f"w{n}"
            home.mkdir()
            (home / "bench.yaml").write_text(CONFIG)
            gateway = start_gateway(
                home, GATEWAY_PORT, n, source=args.source, cpus=cpu_list(gateway_cpus[:n])
            )
            try:
                url = f"http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions"
                connections = PER_WORKER_CONNECTIONS * n
                run_wrk(url, connections, 2, script, wrk_on, threads)  # warm-up
                pids = tree(gateway.pid)
                before = tree_cpu_s(pids)
                row = run_wrk(url, connections, args.seconds, script, wrk_on, threads)
                spent = tree_cpu_s(pids) - before
                row["connections"] = connections
                row["cpu_ms_per_req"] = 1000 * spent / (row["rps"] * args.seconds)
                results[f"{n} workers"] = row
                print(f"{n} workers: {row['rps']:,.0f} req/s", flush=True)
            finally:
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(timeout=30)
    finally:
        for mock in mocks:
            mock.send_signal(signal.SIGTERM)
        for mock in mocks:
            mock.wait(timeout=20)
    source = str((args.source or ROOT.parent).resolve())
    report(results, counts, args.seconds, (gateway_cpus, wrk_cpus, mock_cpus), source)


def report(
    results: dict[str, dict[str, float]],
    counts: list[int],
    seconds: int,
    split: tuple[range, range, range],
    source: str,
) -> None:
    one = results[f"{counts[0]} workers"]["rps"] / counts[0]
    gateway_cpus, wrk_cpus, mock_cpus = split
    lines = [
        f"grifo workers, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"wrk {seconds}s per test; gateway on CPUs {cpu_list(gateway_cpus)}, "
        f"wrk ({len(wrk_cpus)} threads) on {cpu_list(wrk_cpus)}, "
        f"{len(mock_cpus)} mock process(es) on {cpu_list(mock_cpus)}; grifo from {source}",
        "",
        "| run | connections | req/s | req/s per worker | x first row per worker | "
        "p50 ms | p99 ms | gateway CPU ms/req | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct = results["direct"]
    lines.append(
        f"| direct (wrk to the mocks) | {direct['connections']:.0f} | {direct['rps']:,.0f} | | | "
        f"{direct['p50_ms']:.2f} | {direct['p99_ms']:.2f} | | {direct['non_2xx']:.0f} |"
    )
    for n in counts:
        row = results[f"{n} workers"]
        lines.append(
            f"| grifo, {n} worker(s) | {row['connections']:.0f} | {row['rps']:,.0f} | "
            f"{row['rps'] / n:,.0f} | x{row['rps'] / n / one:.2f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['cpu_ms_per_req']:.3f} | {row['non_2xx']:.0f} |"
        )
    print("\n".join(lines))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"workers-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(
            {"cpus": os.cpu_count(), "cpu": cpu_model(), "source": source, "runs": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
