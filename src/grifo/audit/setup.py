"""Open a gateway process's audit log from the config: keys, secrets, spool replay, head."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from pathlib import Path

import msgspec

from grifo.audit.log import AuditLog, replay_audit_spool
from grifo.audit.signing import Signer, load_or_create, public_pem
from grifo.config.model import GrifoConfig
from grifo.store.select import StateStore


def gateway_name(config: GrifoConfig) -> str:
    return config.gateway.audit.name or socket.gethostname().split(".")[0].lower() or "grifo"


def signer(config: GrifoConfig, state_dir: Path) -> Signer:
    key_file = config.gateway.audit.key_file
    path = Path(key_file) if key_file else state_dir / "audit-signing.pem"
    return load_or_create(path, gateway_name(config))


def retired_dir(state_dir: Path) -> Path:
    return state_dir / "audit-keys"


def rotate_key(config: GrifoConfig, state_dir: Path) -> Signer:
    """Retire the signing key (its public half is kept, and exported, so the checkpoints it
    signed still verify) and start a new one. Restart the gateway to sign with it."""
    key_file = config.gateway.audit.key_file
    path = Path(key_file) if key_file else state_dir / "audit-signing.pem"
    old = signer(config, state_dir)
    retired = retired_dir(state_dir)
    retired.mkdir(parents=True, exist_ok=True)
    (retired / f"{old.key_id().hex()}.pem").write_text(public_pem(old.public_key))
    fresh = path.with_suffix(".new")
    fresh.unlink(missing_ok=True)
    new = load_or_create(fresh, old.name)
    fresh.replace(path)
    return new


def retired_pems(state_dir: Path) -> list[str]:
    directory = retired_dir(state_dir)
    return [p.read_text() for p in sorted(directory.glob("*.pem"))] if directory.is_dir() else []


def open_audit_log(
    config: GrifoConfig, state_dir: Path, db: StateStore, worker: int, *, first: bool
) -> AuditLog:
    """The audit log of gateway process `worker`; the `first` process replays what earlier
    runs left in the spool before any log is continued."""
    spool = state_dir / "spool"
    if first:
        replay_audit_spool(db.open_audit, spool)
    audit = config.gateway.audit
    return AuditLog(
        f"{gateway_name(config)}/{_instance(state_dir)}/{worker}",
        signer(config, state_dir),
        db.open_audit,
        spool,
        _hmac_master(audit.hmac_key_env, state_dir / "audit-hmac.key"),
        policy_digest(config),
        checkpoint_every=audit.checkpoint_every,
    )


def _instance(state_dir: Path) -> str:
    """This state directory's id, kept in it: replicas (one state directory each, possibly on
    one host under one name) never append to the same log, and a restart continues its own."""
    path = state_dir / "audit-instance"
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(4) + "\n")
    return path.read_text().strip()


def policy_digest(config: GrifoConfig) -> str:
    """A short digest of the configuration a decision was made under."""
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()[:16]


def _hmac_master(env: str | None, path: Path) -> bytes:
    if env:
        return os.environ[env].encode()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()  # another process made it first
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()
