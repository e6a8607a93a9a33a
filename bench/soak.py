"""Memory soak: drive grifo with wrk for N minutes and sample the gateway's RSS.

Reports RSS after start-up, after a warm-up minute, and at the end, plus requests served, to show
whether memory grows under sustained load. Usage: python bench/soak.py [--minutes 10]
[--connections 16] [--rate 5000]

Without `--rate` each connection sends its next request as soon as the last is answered (as
fast as the gateway goes). Debian's wrk has no fixed-rate mode (wrk2's), so `--rate R` paces
each connection with wrk's `delay()` hook instead: a connection waits about `connections / R`
seconds after each answer before its next request, corrected once a second towards R (see
`pacing`). The rate reached is reported; R must be below what the gateway can serve on that
many connections.
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


def rss_mib(pid: int) -> tuple[float, float]:
    """The process's resident memory and its anonymous part (the heaps: Python's objects and
    C allocations; the rest is mapped files, such as the spool's segments), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            fields[name] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("RssAnon", 0.0)


def pacing(args: argparse.Namespace) -> str:
    """wrk's `delay()`: milliseconds to wait before a connection's next request, so that the
    connections together send about `args.rate` requests a second. wrk's timers are whole
    milliseconds and fire late by up to one, and each answer takes its own time, so the mean
    delay is corrected once a second by how far the last second's count fell from the aim
    (damped: by the square root of the ratio)."""
    return f"""
local target = {args.rate}
local mean = {args.connections * 1000 / args.rate}
local second, count = os.time(), 0
function delay()
  count = count + 1
  local now = os.time()
  if now ~= second then
    mean = mean * math.sqrt(count / (now - second) / target)
    second, count = now, 0
  end
  local low = math.floor(mean)
  if math.random() < mean - low then return low + 1 end
  return low
end
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, help="requests per second to aim at (paced)")
    args = parser.parse_args()
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    work = Path(tempfile.mkdtemp(prefix="grifo-soak-"))
    (work / "bench.yaml").write_text(overhead.CONFIG)
    script = work / "post.lua"
    script.write_text(overhead.LUA + ("" if args.rate is None else pacing(args)))
    mock = overhead.start_mock()
    gateway = None
    samples: list[tuple[float, float, float]] = []  # seconds, RSS, anonymous RSS
    try:
        gateway = overhead.start_gateway(work)
        idle, idle_anon = rss_mib(gateway.pid)
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
            samples.append((time.monotonic() - start, *rss_mib(gateway.pid)))
            time.sleep(10)
        out = load.stdout.read() if load.stdout else ""
    finally:
        for proc in (gateway, mock):
            if proc is not None:
                proc.terminate()
                proc.wait(20)
    rps = float(out.split("Requests/sec:")[1].split()[0]) if "Requests/sec:" in out else 0.0
    warm = next((s for s in samples if s[0] >= 60), samples[0] if samples else (0, 0, 0))
    result = {
        "minutes": args.minutes,
        "connections": args.connections,
        "rate_aimed_at": args.rate,
        "requests_per_s": rps,
        "idle_rss_mib": round(idle, 1),
        "rss_after_1_min_mib": round(warm[1], 1),
        "rss_end_mib": round(samples[-1][1], 1) if samples else None,
        "rss_max_mib": round(max(s[1] for s in samples), 1) if samples else None,
        "idle_anon_mib": round(idle_anon, 1),
        "anon_after_1_min_mib": round(warm[2], 1),
        "anon_end_mib": round(samples[-1][2], 1) if samples else None,
        "anon_max_mib": round(max(s[2] for s in samples), 1) if samples else None,
    }
    print(json.dumps(result, indent=2))
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({**result, "samples": samples}, indent=2)
    )


if __name__ == "__main__":
    main()
