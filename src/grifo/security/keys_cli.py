"""`grifo keys`: create, revoke and list API keys in the state database."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from grifo.config.load import ConfigError, load_config
from grifo.store.records import StoredKey
from grifo.store.select import StateStore


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, revoke and list API keys in the state database",
        description="API keys kept (hashed) in the state directory; running gateways pick up "
        "changes within seconds. A new key is printed once and never stored in clear.",
    )
    keys.add_argument("action", choices=["create", "revoke", "list"])
    keys.add_argument("key_id", nargs="?", help="for revoke: the key id (see list)")
    keys.add_argument(
        "--role",
        choices=["user", "tenant-admin", "auditor", "admin"],
        default="user",
        help="for create: user (inference), tenant-admin, auditor or admin (see README)",
    )
    keys.add_argument("--tenant", help="for create: a tenant of --config")
    keys.add_argument(
        "--expires-days", type=float, help="for create: the key stops working after this"
    )
    keys.add_argument("--models", help="for create: the only models it may use (a,b,c)")
    keys.add_argument(
        "--config",
        type=Path,
        help="the topology naming the tenant (needed for create), and whose store holds keys",
    )
    keys.add_argument("--state-dir", type=Path, default=None)


def run(args: argparse.Namespace, db: StateStore) -> int:
    import datetime as dt

    from grifo.security.keys import generate_key, hash_key

    try:
        if args.action == "create":
            if not args.tenant or not args.config:
                raise ConfigError("keys create needs --tenant and --config")
            if args.tenant not in {t.name for t in load_config(args.config).tenants}:
                raise ConfigError(f"{args.config}: no tenant named {args.tenant!r}")
            key = generate_key()
            key_id = f"key-{key[4:12]}"
            expires = None
            if args.expires_days is not None:
                expires = int((time.time() + args.expires_days * 86400) * 1000)
            models = ",".join(m.strip() for m in (args.models or "").split(",") if m.strip())
            db.add_key(StoredKey(key_id, args.tenant, hash_key(key), args.role, expires, models))
            print(f"{key_id} {key}")
            print("the key is shown once; only its hash is kept", file=sys.stderr)
            return 0
        if args.action == "revoke":
            if not args.key_id or not db.revoke_key(args.key_id):
                print(f"grifo: no active key {args.key_id!r}", file=sys.stderr)
                return 1
            return 0
        for key_id, tenant, created, revoked in db.list_keys():
            stamp = dt.datetime.fromtimestamp(created / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
            print(f"{key_id:<28} {tenant:<20} {stamp}  {'revoked' if revoked else 'active'}")
        return 0
    finally:
        db.close()
