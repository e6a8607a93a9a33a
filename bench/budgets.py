"""What budgets cost the gateway: wrk at c=64 through grifo with no budget, with a strict tenant
budget reserved in SQLite, and with the reservation in Redis (leased, and per request). The
gateways are started once, all on CPU 1 (wrk and the mock point on CPU 0), and take turns under
load for some short rounds, each round starting with the next config so that none always runs
first. Medians, and ratios to no budget as the median of each round's own ratio: rounds are
seconds apart, so a host whose speed drifts over minutes moves both sides of a ratio together.
`--only` picks configs by name. `--workers N` runs each gateway as N processes (on the same
CPU): budgets on one host are then reserved in the SQLite state database they share.

Usage: python bench/budgets.py [--seconds 3] [--rounds 10] [--redis redis://127.0.0.1:6379/0]
                               [--only "budget, Redis"]
"""

from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path

import redis
from compare import tree, tree_cpu_s
from overhead import CONFIG, GATEWAY_PORT, LUA, run_wrk, start_gateway, start_mock

BUDGET = "tenants: [{name: bench, budget: {usd: 1000000, period: month, mode: strict}}]"


def configs(redis_url: str, prefix: str, workers: int = 1) -> dict[str, str]:
    """The audit log is off in all of them, so the difference is what budgets cost. Redis
    twice: with leases (the default) and with a Redis call per request (leases off); with
    `workers`, the state database twice too."""
    base = CONFIG.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    budgeted = base.replace("tenants: [{name: bench}]", BUDGET)
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


def measure(
    port: int, gateway: subprocess.Popen[bytes], work: Path, seconds: int
) -> tuple[float, float]:
    """(req/s, gateway CPU ms per request) at c=64."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    pids = tree(gateway.pid)  # the supervisor and its workers
    before = tree_cpu_s(pids)
    result = run_wrk(url, 64, seconds, work / "post.lua")
    spent = tree_cpu_s(pids) - before
    assert result["non_2xx"] == 0, result
    return result["rps"], 1000 * spent / (result["rps"] * seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", action="append", help="a config to run besides no budget")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes per gateway, all on CPU 1 (SQLite: reservations in the state database)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-bench-"))
    (work / "post.lua").write_text(LUA)
    prefix = f"grifo-bench-{secrets.token_hex(4)}"
    runs = [
        (name, config)
        for name, config in configs(args.redis, prefix, args.workers).items()
        if not args.only or name == "no budget" or name in args.only
    ]
    mock = start_mock()
    gateways: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    rates: dict[str, list[tuple[float, float]]] = {}
    try:
        for n, (name, config) in enumerate(runs):
            port = GATEWAY_PORT + 10 + n
            home = work / f"gateway-{n}"
            home.mkdir()
            (home / "bench.yaml").write_text(
                config.replace(f"port: {GATEWAY_PORT}", f"port: {port}")
            )
            gateways[name] = (port, start_gateway(home, port, args.workers))
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            run_wrk(url, 8, 2, work / "post.lua")  # warm-up
        for turn in range(args.rounds):
            # each round starts with the next config: no config always runs first (or last)
            for name, _ in runs[turn % len(runs) :] + runs[: turn % len(runs)]:
                rps, cpu = measure(*gateways[name], work, args.seconds)
                rates.setdefault(name, []).append((rps, cpu))
                print(f"round {turn + 1}, {name}: {rps:,.0f} req/s, {cpu:.3f} CPU ms/request")
    finally:
        for _, gateway in gateways.values():
            gateway.send_signal(signal.SIGTERM)
        for _, gateway in gateways.values():
            gateway.wait(timeout=20)
        mock.send_signal(signal.SIGTERM)
        mock.wait(timeout=20)
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
        rps = statistics.median(r for r, _ in values)
        cpu = statistics.median(c for _, c in values)
        rps_ratio = statistics.median(r / b for (r, _), (b, _) in zip(values, base, strict=True))
        cpu_ratio = statistics.median(c / b for (_, c), (_, b) in zip(values, base, strict=True))
        print(f"| {name} | {rps:,.0f} | x{rps_ratio:.2f} | {cpu:.3f} | x{cpu_ratio:.2f} |")


if __name__ == "__main__":
    main()
