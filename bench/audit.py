"""What the audit log costs the gateway: wrk at c=64 with the audit log off, with records but no
attestations, and with both (the default), one gateway at a time on CPU 1, alternating 3
rounds; medians of req/s and gateway CPU per request.

Usage: cd bench && ../.venv/bin/python audit.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
from pathlib import Path

from budgets import measure
from overhead import CONFIG, LUA, start_mock

CONFIGS = {
    "audit off": CONFIG.replace("gateway: {", "gateway: {audit: {enabled: false}, "),
    "records, no attestation": CONFIG.replace("gateway: {", "gateway: {audit: {attest: false}, "),
    "records + attestation (default)": CONFIG,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-bench-"))
    (work / "post.lua").write_text(LUA)
    mock = start_mock()
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(3):
            for name, config in CONFIGS.items():
                results.setdefault(name, []).append(measure(config, work, args.seconds))
    finally:
        mock.send_signal(signal.SIGTERM)
        mock.wait(timeout=20)
    print(f"| gateway at c=64, {args.seconds}s x 3 rounds | req/s | gateway CPU ms/request |")
    print("|---|---:|---:|")
    for name, values in results.items():
        rps = statistics.median(r for r, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"| {name} | {rps:,.0f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
