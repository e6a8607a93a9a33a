"""`grifo audit export|verify|verify-attestation|public-key`."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from grifo.config.model import GrifoConfig
from grifo.store.select import resolve_state_dir


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser(
        "audit",
        help="export and verify the audit log; verify attestations",
        description="export: write the audit log (all, or one tenant and time window) with its "
        "signed checkpoints and public key for an auditor. verify: check an export offline "
        "(edited, deleted, inserted or reordered records are named). verify-attestation: "
        "check a response's x-grifo-attestation. public-key: print the signing key's public half.",
    )
    audit.add_argument(
        "action",
        choices=["export", "verify", "verify-attestation", "public-key", "prune", "rotate-key"],
    )
    audit.add_argument("target", nargs="?", help="export/verify: a directory; or the attestation")
    audit.add_argument("--config", type=Path, help="the gateway's topology (its store and name)")
    audit.add_argument("--state-dir", type=Path, default=None)
    audit.add_argument("--tenant", help="export: only this tenant's records in full")
    audit.add_argument("--from", dest="since", help="export: from this UTC date/time (ISO 8601)")
    audit.add_argument(
        "--to", dest="until", help="export: before this UTC date/time; prune: records before it"
    )
    audit.add_argument("--public-key", type=Path, help="verify: the PEM (default: the export's)")
    audit.add_argument("--key-name", help="verify: the signer's name (default: from the log)")
    audit.add_argument(
        "--point-keys",
        type=Path,
        help='verify: JSON {"<point>": "<base64 public key>"} from the points\' operators '
        "(each point shows its key in /health); receipts are then checked",
    )


def run(args: argparse.Namespace) -> int:
    import msgspec

    from grifo.audit.signing import (
        CheckpointError,
        load_public,
        public_from_b64,
        public_pem,
        verify_attestation,
    )
    from grifo.audit.verify import export, verify

    if args.action == "verify":
        directory = _target(args)
        pems = [args.public_key] if args.public_key else sorted(directory.glob("public-keys/*.pem"))
        pems = pems or [directory / "public-key.pem"]
        public = [load_public(p.read_bytes()) for p in pems]
        points = {}
        if args.point_keys is not None:
            raw = msgspec.json.decode(args.point_keys.read_bytes(), type=dict[str, str])
            points = {name: public_from_b64(key) for name, key in raw.items()}
        report = verify(directory, public, args.key_name, points)
        for problem in report.problems:
            print(f"FAIL {problem}")
        verdict = "verified" if report.ok else f"{len(report.problems)} problems"
        print(
            f"{report.logs} logs, {report.records} records, {report.checkpoints} checkpoints, "
            f"{report.receipts} point receipts checked ({report.unchecked} records unchecked): "
            f"{verdict}"
        )
        return 0 if report.ok else 1
    if args.action == "verify-attestation":
        if args.public_key is None:
            print("grifo: verify-attestation needs --public-key", file=sys.stderr)
            return 2
        try:
            claims = verify_attestation(_arg(args), load_public(args.public_key.read_bytes()))
        except CheckpointError as exc:
            print(f"FAIL {exc}")
            return 1
        print(
            f"verified: request {claims.request_id} ran at {claims.point} "
            f"({claims.jurisdiction}), model {claims.model}, audit {claims.log} #{claims.seq}"
        )
        return 0
    config, state_dir = _config(args)
    from grifo.audit.setup import retired_pems, rotate_key, signer

    if args.action == "rotate-key":
        new = rotate_key(config, state_dir)
        print(f"new audit signing key {new.key_id().hex()}; restart the gateway to use it")
        return 0
    key = signer(config, state_dir)
    if args.action == "public-key":
        print(public_pem(key.public_key), end="")
        return 0
    from grifo.store.audit_sql import iter_logs
    from grifo.store.select import open_state

    db = open_state(config.gateway.store, state_dir)
    tables = db.open_audit()
    if args.action == "prune":
        keep_ms = config.gateway.audit.retention_days * 86_400_000
        before = _ms(args.until) or int(dt.datetime.now(dt.UTC).timestamp() * 1000) - keep_ms
        try:
            print(f"pruned the content of {tables.prune(before)} records (hashes kept)")
        finally:
            tables.close()
            db.close()
        return 0
    try:
        full = export(
            iter_logs(tables),
            _target(args),
            public_pem(key.public_key),
            retired_pems=retired_pems(state_dir),
            tenant=args.tenant,
            since_ms=_ms(args.since) or 0,
            until_ms=_ms(args.until),
        )
    finally:
        tables.close()
        db.close()
    print(f"exported {full} records to {args.target}")
    return 0


def _arg(args: argparse.Namespace) -> str:
    if not args.target:
        raise SystemExit(f"grifo audit {args.action} needs a target")
    return str(args.target)


def _target(args: argparse.Namespace) -> Path:
    return Path(_arg(args))


def _config(args: argparse.Namespace) -> tuple[GrifoConfig, Path]:
    from grifo.config.load import default_config, load_config

    config = load_config(args.config) if args.config else default_config()
    state_dir = resolve_state_dir(args.state_dir)
    return config, state_dir


def _ms(text: str | None) -> int | None:
    if text is None:
        return None
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)
