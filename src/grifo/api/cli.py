"""`grifo points` and `grifo tenants`: the fabric from the command line.

`grifo points` asks a running gateway (`GET /admin/points`, with an admin-role key from
`--key` or `GRIFO_ADMIN_KEY`) for every point's state; `grifo tenants` shows what a topology
file lets each tenant do (jurisdictions, tier, priority, budget, data classes, guardrails), and
`grifo tenants set|delete NAME --url ...` makes, replaces or deletes a tenant through the
gateway's admin API (`PUT`/`DELETE /admin/tenants/<name>`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from grifo.config.load import default_config, load_config
from grifo.jurisdictions import expand, merge_blocs


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    points = sub.add_parser("points", help="every point's state, from a running gateway")
    points.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    points.add_argument("--key", help="an admin-role key (default: $GRIFO_ADMIN_KEY)")
    points.add_argument("--json", action="store_true", help="the API's JSON as it is")
    tenants = sub.add_parser(
        "tenants", help="what a topology lets each tenant do; set or delete one over the API"
    )
    tenants.add_argument("action", nargs="?", choices=["set", "delete"])
    tenants.add_argument("name", nargs="?", help="the tenant to set or delete")
    tenants.add_argument("--config", type=Path, help="topology YAML (default: the demo)")
    tenants.add_argument("--json", action="store_true", help="one JSON object per tenant")
    tenants.add_argument(
        "--body", help='set: the tenant as JSON, e.g. \'{"allowed_jurisdictions": ["PE"]}\''
    )
    tenants.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    tenants.add_argument("--key", help="an admin-role key (default: $GRIFO_ADMIN_KEY)")


def _admin(args: argparse.Namespace, method: str, path: str, data: bytes | None = None) -> Any:
    """The admin API's JSON answer, or an exit code after saying what went wrong."""
    key = args.key or os.environ.get("GRIFO_ADMIN_KEY")
    if not key:
        print("grifo: give --key or set GRIFO_ADMIN_KEY (an admin-role key)", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        print("grifo: --url must be http:// or https://", file=sys.stderr)
        return 2
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        f"{url}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read() or b"{}").get("error", {}).get("message", exc.reason)
        print(f"grifo: the gateway answered {exc.code}: {message}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"grifo: cannot reach {args.url}: {exc.reason}", file=sys.stderr)
        return 1


def run_points(args: argparse.Namespace) -> int:
    body = _admin(args, "GET", "/admin/points")
    if isinstance(body, int):
        return body
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(
        f"{'point':<22}{'where':<8}{'tier':<10}{'source':<12}{'state':<9}{'in flight':>10}"
        f"{'limit':>7}  reason"
    )
    for p in body["data"]:
        print(
            f"{p['name']:<22}{p['jurisdiction']:<8}{p['tier']:<10}{p.get('source', ''):<12}"
            f"{p['state']:<9}{p['in_flight']:>10}{p['concurrency_limit'] or '-':>7}  {p['reason']}"
        )
    return 0


def run_tenants(args: argparse.Namespace) -> int:
    if args.action is not None:
        return _change_tenant(args)
    config = load_config(args.config) if args.config else default_config()
    blocs = merge_blocs(config.blocs)
    for tenant in config.tenants:
        allowed = tenant.allowed_jurisdictions
        places = "any" if allowed is None else ",".join(sorted(expand(allowed, blocs)))
        budget = tenant.budget
        spend = "none" if budget is None else f"{budget.usd} USD/{budget.period} ({budget.mode})"
        rails = f"pii {tenant.guardrails.pii}, injection {tenant.guardrails.injection}"
        if args.json:
            row = {
                "tenant": tenant.name,
                "jurisdictions": places,
                "tier": tenant.tier,
                "priority": tenant.priority,
                "weight": tenant.weight,
                "budget": spend,
                "data_classes": sorted(tenant.data_classes),
                "guardrails": rails,
            }
            print(json.dumps(row))
        else:
            print(
                f"{tenant.name:<20} jurisdictions {places}; tier {tenant.tier}; priority "
                f"{tenant.priority}; budget {spend}; {rails}"
            )
    return 0


def _change_tenant(args: argparse.Namespace) -> int:
    if not args.name:
        print(f"grifo: tenants {args.action} needs the tenant's name", file=sys.stderr)
        return 2
    if args.action == "delete":
        answer = _admin(args, "DELETE", f"/admin/tenants/{args.name}")
    else:
        try:
            body = json.loads(args.body or "{}")
        except ValueError:
            print("grifo: --body must be a JSON object", file=sys.stderr)
            return 2
        answer = _admin(args, "PUT", f"/admin/tenants/{args.name}", json.dumps(body).encode())
    if isinstance(answer, int):
        return answer
    print(json.dumps(answer, indent=2))
    return 0
