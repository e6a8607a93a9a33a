"""What the audit log costs the gateway: wrk at c=64 with the audit log off, with records but no
attestations, and with both (the default), the gateways taking turns under load (`turns.py`,
all on CPU 1); medians of req/s and gateway CPU per request, and ratios to the audit log off as
the median of each round's own ratio.

Usage: python bench/audit.py [--seconds 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from overhead import CONFIG
from turns import Variant, take_turns

CONFIGS = {
    "audit off": CONFIG.replace("gateway: {", "gateway: {audit: {enabled: false}, "),
    "records, no attestation": CONFIG.replace("gateway: {", "gateway: {audit: {attest: false}, "),
    "records + attestation (default)": CONFIG,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-bench-"))
    variants = [Variant(name, config) for name, config in CONFIGS.items()]
    rates = take_turns(variants, work, args.rounds, args.seconds)
    base = rates["audit off"]
    print(
        f"\n| gateway at c=64, {args.seconds}s x {args.rounds} rounds | req/s | vs audit off "
        "| gateway CPU ms/request | vs audit off | p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        values = rates[name]
        pairs = list(zip(values, base, strict=True))
        rps = statistics.median(r.rps for r in values)
        cpu = statistics.median(r.cpu_ms for r in values)
        p99 = statistics.median(r.p99_ms for r in values)
        rps_ratio = statistics.median(r.rps / b.rps for r, b in pairs)
        cpu_ratio = statistics.median(r.cpu_ms / b.cpu_ms for r, b in pairs)
        print(
            f"| {name} | {rps:,.0f} | x{rps_ratio:.2f} | {cpu:.3f} | x{cpu_ratio:.2f} | {p99:.2f} |"
        )


if __name__ == "__main__":
    main()
