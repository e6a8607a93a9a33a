"""Gateway overhead: wrk against the mock point directly and through grifo, in the same run.

The gateway runs alone on CPU 1 (`taskset`), wrk and the mock share CPU 0, so the gateway numbers
are "one core of gateway". Full pipeline on: key check, tenant policy, placement, a rate limit
(one too high to refuse anything, but checked and charged on every request), metering to the
SQLite ledger, metrics, the audit log. Prints a markdown table and writes
bench/results/overhead-<time>.json.

Usage: python bench/overhead.py [--seconds 10]   (needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MOCK_PORT, GATEWAY_PORT = 18901, 18900
KEY = "grf-bench000-benchmark-key-not-secret"
BODY = json.dumps(
    {"model": "mock-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
)
LUA = f"""
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {KEY}"
"""
# The tenant's rate limit: checked and charged on every request, as the performance targets'
# pipeline has it, and too high ever to refuse one.
LIMITS = "limits: {requests_per_min: 1000000000, tokens_per_min: 1000000000000}"
TENANT = f"{{name: bench, {LIMITS}}}"
CONFIG = f"""
gateway: {{port: {GATEWAY_PORT}, health_interval_s: 1.0}}
points:
  - {{name: mock, site: bench, region: local, jurisdiction: PE, tier: edge, rtt_ms: 1,
     url: "http://127.0.0.1:{MOCK_PORT}",
     prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 0.02, output_usd_per_1m: 0.04}}}}}}
tenants: [{TENANT}]
keys: [{{id: bench-1, tenant: bench, env: GRIFO_BENCH_KEY}}]
"""


def wait_http(
    url: str, timeout_s: float = 30, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until `url` answers; a `process` that serves it and exits ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: its server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_mock(cpus: str = "0", shared: bool = False) -> subprocess.Popen[bytes]:
    """The mock point on CPU 0 (with wrk), or on `cpus`, once it answers; `shared`: one of
    several mock processes sharing the port (SO_REUSEPORT)."""
    mock = subprocess.Popen(
        [
            "taskset",
            "-c",
            cpus,
            sys.executable,
            str(ROOT / "mock_point.py"),
            str(MOCK_PORT),
            *(["--reuse-port"] if shared else []),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{MOCK_PORT}/health", process=mock)
    return mock


def start_gateway(
    work: Path,
    port: int = GATEWAY_PORT,
    workers: int = 1,
    source: Path | None = None,
    cpus: str = "1",
    python: str | None = None,
) -> subprocess.Popen[bytes]:
    """`grifo serve` on CPU 1 (or on `cpus`) with `work/bench.yaml` (listening on `port`;
    `workers` processes, all on those CPUs), once it is ready; `source`: a checkout whose
    `src/grifo` to run instead of the installed one; `python`: the interpreter (default this
    one)."""
    env = {**os.environ, "GRIFO_BENCH_KEY": KEY}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source / "src"), os.environ.get("PYTHONPATH")) if p
        )
    gateway = subprocess.Popen(
        [
            "taskset",
            "-c",
            cpus,
            python or sys.executable,
            "-m",
            "grifo",
            "serve",
            "--config",
            str(work / "bench.yaml"),
            "--state-dir",
            str(work / "state"),
            *(["--workers", str(workers)] if workers > 1 else []),
        ],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    wait_http(f"http://127.0.0.1:{port}/readyz", process=gateway)
    return gateway


def run_wrk(
    url: str, connections: int, seconds: int, script: Path, cpus: str = "0", threads: int = 1
) -> dict[str, float]:
    """wrk on CPU 0 (or on `cpus`, with `threads` threads): req/s, p50/p99 ms, non-2xx."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_s(pid: int) -> float:
    return sum(cpu_split(pid))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="grifo-bench-"))
    (work / "bench.yaml").write_text(CONFIG)
    script = work / "post.lua"
    script.write_text(LUA)
    mock = start_mock()
    gateway = None
    try:
        gateway = start_gateway(work)
        direct_url = f"http://127.0.0.1:{MOCK_PORT}/v1/chat/completions"
        grifo_url = f"http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions"
        run_wrk(grifo_url, 8, 2, script)  # warm-up
        results: dict[str, dict[str, float]] = {}
        for name, url in (("direct", direct_url), ("grifo", grifo_url)):
            results[f"{name} c1"] = run_wrk(url, 1, args.seconds, script)
            before = cpu_s(gateway.pid)
            results[f"{name} c64"] = run_wrk(url, 64, args.seconds, script)
            if name == "grifo":
                spent = cpu_s(gateway.pid) - before
                total = results["grifo c64"]["rps"] * args.seconds
                results["grifo c64"]["cpu_ms_per_req"] = 1000 * spent / total
    finally:
        for proc in (gateway, mock):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
    report(results, args.seconds)


def report(results: dict[str, dict[str, float]], seconds: int) -> None:
    d1, g1, d64, g64 = (results[k] for k in ("direct c1", "grifo c1", "direct c64", "grifo c64"))
    lines = [
        f"grifo overhead, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
        f"wrk {seconds}s per test, gateway pinned to CPU 1",
        "",
        "| measure | direct | through grifo | added / ratio |",
        "|---|---:|---:|---:|",
        f"| p50 latency at c=1 (ms) | {d1['p50_ms']:.3f} | {g1['p50_ms']:.3f} | "
        f"+{g1['p50_ms'] - d1['p50_ms']:.3f} |",
        f"| p99 latency at c=1 (ms) | {d1['p99_ms']:.3f} | {g1['p99_ms']:.3f} | "
        f"+{g1['p99_ms'] - d1['p99_ms']:.3f} |",
        f"| req/s at c=64 | {d64['rps']:,.0f} | {g64['rps']:,.0f} | "
        f"x{g64['rps'] / d64['rps']:.2f} |",
        f"| p99 latency at c=64 (ms) | {d64['p99_ms']:.2f} | {g64['p99_ms']:.2f} | "
        f"+{g64['p99_ms'] - d64['p99_ms']:.2f} |",
        f"| gateway CPU per request at c=64 (ms) | | {g64['cpu_ms_per_req']:.3f} | |",
        f"| non-2xx answers | {d64['non_2xx']:.0f} | {g64['non_2xx']:.0f} | |",
    ]
    print("\n".join(lines))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(results, indent=2)
    )


if __name__ == "__main__":
    main()
