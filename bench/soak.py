"""Memory soak: drive grifo with wrk for N minutes and sample the gateway's RSS.

Reports RSS after start-up, after a warm-up minute, and at the end, plus requests served, to show
whether memory grows under sustained load. Usage: python bench/soak.py [--minutes 10] [--rate 5000]
(wrk2-style fixed rates are not available in Debian's wrk: --rate caps connections instead, and
the achieved rate is reported).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import overhead  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-soak-"))
    (work / "bench.yaml").write_text(overhead.CONFIG)
    script = work / "post.lua"
    script.write_text(overhead.LUA)
    mock = overhead.start_mock()
    gateway = None
    samples: list[tuple[float, float]] = []
    try:
        gateway = overhead.start_gateway(work)
        idle = rss_mib(gateway.pid)
        seconds = int(args.minutes * 60)
        load = subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{seconds}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{overhead.GATEWAY_PORT}/v1/chat/completions",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        start = time.monotonic()
        while load.poll() is None:
            samples.append((time.monotonic() - start, rss_mib(gateway.pid)))
            time.sleep(10)
        out = load.stdout.read() if load.stdout else ""
    finally:
        for proc in (gateway, mock):
            if proc is not None:
                proc.terminate()
                proc.wait(20)
    rps = float(out.split("Requests/sec:")[1].split()[0]) if "Requests/sec:" in out else 0.0
    after_warmup = next((r for t, r in samples if t >= 60), samples[0][1] if samples else 0)
    result = {
        "minutes": args.minutes,
        "requests_per_s": rps,
        "idle_rss_mib": round(idle, 1),
        "rss_after_1_min_mib": round(after_warmup, 1),
        "rss_end_mib": round(samples[-1][1], 1) if samples else None,
        "rss_max_mib": round(max(r for _, r in samples), 1) if samples else None,
    }
    print(json.dumps(result, indent=2))
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({**result, "samples": samples}, indent=2)
    )


if __name__ == "__main__":
    main()
