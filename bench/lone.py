"""One client at a time (c=1): where a lone request's added latency is spent.

Sends requests one after another over one keep-alive connection to `grifo serve` (the
`overhead.py` setup, gateway on CPU 1, mock point and this client on CPU 0) and, per request,
reads the end-to-end time and the gateway's own time (`x-grifo-overhead-ms`: from the request's
decoding to its answer ready to write, the point's time left out). Percentiles of both say
whether a slow tail is the pipeline's or lies outside it (the hops, waking the gateway's
vCPU, the HTTP layer's reads and writes). It also reports the gateway process's CPU per
request (user and system, all threads) over the run, to hold against the same figure at c=64
(`compare.py`). The client is Python, slower than wrk: read the end-to-end column against
`compare.py`'s c=1 numbers only for its shape.

Usage: python bench/lone.py [--seconds 8] [--audit on|off]
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
import tempfile
import time
from pathlib import Path

from overhead import BODY, CONFIG, GATEWAY_PORT, KEY, cpu_split, start_gateway, start_mock

WARM_UP = 500  # requests left out of the percentiles


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        f"p{q}": ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]
        for q in (50, 90, 99, 99.9)
    } | {"max": ordered[-1]}


def drive(seconds: float) -> tuple[list[float], list[float]]:
    """(end-to-end ms, gateway's own ms) of each request after the warm-up."""
    conn = http.client.HTTPConnection("127.0.0.1", GATEWAY_PORT)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    total: list[float] = []
    own: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", BODY, headers)
        response = conn.getresponse()
        response.read()
        total.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            sys.exit(f"the gateway answered {response.status}")
        own.append(float(response.getheader("x-grifo-overhead-ms") or "nan"))
    conn.close()
    return total[WARM_UP:], own[WARM_UP:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--audit", choices=["on", "off"], default="on")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-lone-"))
    config = CONFIG
    if args.audit == "off":
        config = config.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    (work / "bench.yaml").write_text(config)
    mock = start_mock()
    gateway = None
    try:
        gateway = start_gateway(work)
        before = cpu_split(gateway.pid)
        total, own = drive(args.seconds)
        after = cpu_split(gateway.pid)
    finally:
        for process in (gateway, mock):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
    sent = len(total) + WARM_UP
    user, system = ((a - b) * 1e6 / sent for a, b in zip(after, before, strict=True))
    print(
        f"c=1, audit {args.audit}, {len(total)} requests after {WARM_UP} of warm-up; gateway "
        f"CPU per request {user:.0f} us user + {system:.0f} us system\n"
    )
    print("| ms | p50 | p90 | p99 | p99.9 | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in (("end to end (Python client)", total), ("gateway's own time", own)):
        row = percentiles(values)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
