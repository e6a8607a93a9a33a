"""`grifo usage` and `grifo budgets`: spending totals and budget burn rates, read from the
ledger of a gateway's state store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from grifo.config.load import load_config
from grifo.config.model import StoreConfig
from grifo.store.select import StateStore, resolve_state_dir


def add_usage_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = sub.add_parser(
        "usage",
        help="spending totals from the ledger",
        description="Requests, tokens and cost (micro-USD) from the ledger in the state "
        "directory (or the PostgreSQL database of --config), grouped by tenant, key, point, "
        "model or jurisdiction.",
    )
    usage.add_argument("--state-dir", type=Path, default=None)
    usage.add_argument("--config", type=Path, help="read the ledger from this config's store")
    usage.add_argument(
        "--by", choices=["tenant", "key", "point", "model", "jurisdiction"], default="tenant"
    )
    usage.add_argument(
        "--period",
        choices=["day", "month", "all"],
        default="month",
        help="the current UTC day or month, or everything (default month)",
    )
    usage.add_argument("--json", action="store_true", help="one JSON object per group")


def add_budgets_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    budgets = sub.add_parser(
        "budgets",
        help="budget burn rates and when each runs out",
        description="For every tenant budget in the config: spent this period, the last hour's "
        "spending rate, the spend projected to the period end, and when the budget runs out.",
    )
    budgets.add_argument("--config", type=Path, required=True)
    budgets.add_argument("--state-dir", type=Path, default=None)


def run_usage(args: argparse.Namespace) -> int:
    import datetime as dt

    state_dir = resolve_state_dir(args.state_dir)
    if args.config is None and not (state_dir / "grifo.db").is_file():
        print(f"grifo: no ledger in {state_dir}", file=sys.stderr)
        return 1
    now = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = {"day": now, "month": now.replace(day=1), "all": None}[args.period]
    db = open_state(args)
    try:
        rows = db.totals(args.by, int(since.timestamp() * 1000) if since else 0)
    finally:
        db.close()
    if args.json:
        for group, n, prompt, completion, cost in rows:
            line = {
                args.by: group,
                "requests": n,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost_micros": cost,
            }
            print(msgspec.json.encode(line).decode())
        return 0
    print(f"{args.by:<24} {'requests':>10} {'prompt tok':>12} {'output tok':>12} {'cost USD':>14}")
    for group, n, prompt, completion, cost in rows:
        usd = f"{cost // 1_000_000}.{cost % 1_000_000:06d}"
        print(f"{group:<24} {n:>10,} {prompt:>12,} {completion:>12,} {usd:>14}")
    return 0


def run_budgets(args: argparse.Namespace) -> int:
    import datetime as dt

    from grifo.admission.burn import burn_rates

    config = load_config(args.config)
    db = open_state(args)
    try:
        burns = burn_rates(
            db, {t.name: t.budget for t in config.tenants if t.budget}, dt.datetime.now(dt.UTC)
        )
    finally:
        db.close()
    print(
        f"{'tenant':<20} {'limit':>12} {'spent':>12} {'per hour':>12} {'projected':>12}  runs out"
    )
    for b in burns:
        when = b.runs_out_at.strftime("%Y-%m-%d %H:%M UTC") if b.runs_out_at else "-"
        print(
            f"{b.tenant:<20} {b.limit_micros:>12,} {b.spent_micros:>12,} "
            f"{b.rate_micros_per_hour:>12,} {b.projected_micros:>12,}  {when}"
        )
    print("(micro-USD)")
    return 0


def open_state(args: argparse.Namespace) -> StateStore:
    """The state database of --config's `gateway.store` (SQLite in --state-dir by default)."""
    from grifo.store.select import open_state

    state_dir = resolve_state_dir(args.state_dir)
    store = load_config(args.config).gateway.store if args.config else StoreConfig()
    return open_state(store, state_dir)
