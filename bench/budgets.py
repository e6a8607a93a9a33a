"""What budgets cost the gateway: wrk at c=64 through grifo with no budget, with a strict tenant
budget reserved in SQLite, and with the reservation in Redis (leased, and per request), the
gateways taking turns under load (`turns.py`). Medians, and ratios to no budget as the median
of each round's own ratio: rounds are seconds apart, so a host whose speed drifts over minutes
moves both sides of a ratio together.
`--only` picks configs by name. `--workers N` runs each gateway as N processes (on the same
CPU): budgets on one host are then reserved in the SQLite state database they share.

Usage: python bench/budgets.py [--seconds 3] [--rounds 12] [--redis redis://127.0.0.1:6379/0]
                               [--only "budget, Redis"]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
from pathlib import Path

import redis
from overhead import CONFIG, LIMITS, TENANT
from turns import Variant, take_turns

BUDGET = f"{{name: bench, {LIMITS}, budget: {{usd: 1000000, period: month, mode: strict}}}}"


def configs(redis_url: str, prefix: str, workers: int = 1) -> dict[str, str]:
    """The audit log is off in all of them, so the difference is what budgets cost. Redis
    twice: with leases (the default) and with a Redis call per request (leases off); with
    `workers`, the state database twice too."""
    base = CONFIG.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    budgeted = base.replace(TENANT, BUDGET)
    assert budgeted != base, "the tenant line of overhead.CONFIG changed"
    store = f'store: {{redis_url: "{redis_url}", redis_prefix: {prefix}}}, '
    unleased = store.replace("}, ", ", budget_lease_requests: 0}, ")
    runs = {
        "no budget": base,
        "budget, SQLite": budgeted,
        "budget, Redis": budgeted.replace("gateway: {", "gateway: {" + store),
        "budget, Redis, per request": budgeted.replace("gateway: {", "gateway: {" + unleased),
    }
    if workers > 1:
        runs["budget, SQLite, per request"] = budgeted.replace(
            "gateway: {", "gateway: {store: {budget_lease_requests: 0}, "
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--only", action="append", help="a config to run besides no budget")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes per gateway, all on CPU 1 (SQLite: reservations in the state database)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-bench-"))
    prefix = f"grifo-bench-{secrets.token_hex(4)}"
    runs = [
        (name, config)
        for name, config in configs(args.redis, prefix, args.workers).items()
        if not args.only or name == "no budget" or name in args.only
    ]
    try:
        rates = take_turns(
            [Variant(name, config) for name, config in runs],
            work,
            args.rounds,
            args.seconds,
            args.workers,
        )
    finally:
        client = redis.Redis.from_url(args.redis)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    base = rates["no budget"]
    print(
        f"| gateway ({args.workers} process(es)) at c=64, {args.seconds}s x {args.rounds} "
        "rounds | req/s (median) "
        "| vs no budget | gateway CPU ms/request | vs no budget |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, _ in runs:
        values = rates[name]
        pairs = list(zip(values, base, strict=True))
        rps = statistics.median(r.rps for r in values)
        cpu = statistics.median(r.cpu_ms for r in values)
        rps_ratio = statistics.median(r.rps / b.rps for r, b in pairs)
        cpu_ratio = statistics.median(r.cpu_ms / b.cpu_ms for r, b in pairs)
        print(f"| {name} | {rps:,.0f} | x{rps_ratio:.2f} | {cpu:.3f} | x{cpu_ratio:.2f} |")


if __name__ == "__main__":
    main()
