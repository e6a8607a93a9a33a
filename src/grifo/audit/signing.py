"""Ed25519 signatures: checkpoints as C2SP signed notes, and per-response attestations.

A checkpoint (C2SP `tlog-checkpoint`) is the text `<origin>\\n<tree size>\\n<base64 root>\\n`
followed by a blank line and one signature line `— <key name> <base64(key id ‖ signature)>`,
where the key id is the first 4 bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key).

An attestation is `<base64url(JSON claims)>.<base64url(signature)>`: the gateway's signed
statement of where one request ran, verifiable offline with its public key; answers signed
together carry a third part, their batch proof (see `batch.py`).

Signatures are libsodium's (PyNaCl): on the request path it signs in about two thirds of the
time `cryptography` takes, and the serving process does not load `cryptography` at all
(~6.5 MiB less resident memory; bench/README.md). Keys stay in the files every Ed25519 tool
reads: PKCS#8 PEM for the private key, SubjectPublicKeyInfo PEM for the public one (RFC 8410).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from grifo.audit.merkle import leaf_hash, root_from_inclusion

_ED25519 = b"\x01"
RECEIPT_HEADER = b"x-grifo-point-receipt"
RECEIPT_COMMENT = b": x-grifo-point-receipt "  # how a stream carries it, before its usage


class Receipt(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a point signs about a request it processed (`x-grifo-point-receipt`): the gateway
    can record it but not forge it, so its claim of where a request ran is checkable against
    the point's own key."""

    request_id: str
    point: str
    jurisdiction: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    ts_ms: int


class Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an attestation says: this request ran at this point, in this jurisdiction."""

    request_id: str
    point: str
    jurisdiction: str
    model: str
    log: str
    seq: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Signer:
    name: str
    private: SigningKey

    @property
    def public_key(self) -> VerifyKey:
        return self.private.verify_key

    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self.private.sign(data).signature

    def sign_checkpoint(self, origin: str, size: int, root: bytes) -> str:
        body = checkpoint_body(origin, size, root)
        stamp = base64.b64encode(self.key_id() + self.sign(body.encode())).decode()
        return f"{body}\n\u2014 {self.name} {stamp}\n"

    def attest(self, claims: Claims | Receipt) -> str:
        """`<base64url(JSON)>.<base64url(signature)>`."""
        payload = msgspec.json.encode(claims)
        return f"{b64url(payload)}.{b64url(self.sign(payload))}"


def key_id(name: str, public: VerifyKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + bytes(public)).digest()[:4]


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


class CheckpointError(ValueError):
    """A checkpoint that does not parse or whose signature does not verify."""


def verify_checkpoint(
    text: str, name: str, public: VerifyKey | Sequence[VerifyKey]
) -> tuple[str, int, bytes]:
    """(origin, size, root) of a checkpoint signed by one of `name`'s keys (after a key
    rotation, the retired ones verify the checkpoints they signed)."""
    body, sep, signatures = text.partition("\n\n")
    if not sep:
        raise CheckpointError("a checkpoint needs a blank line before its signatures")
    body += "\n"
    keys = {key_id(name, k): k for k in ([public] if isinstance(public, VerifyKey) else public)}
    for line in signatures.splitlines():
        prefix = f"\u2014 {name} "
        if not line.startswith(prefix):
            continue
        raw = base64.b64decode(line[len(prefix) :], validate=True)
        if raw[:4] not in keys:
            continue
        public = keys[raw[:4]]
        try:
            public.verify(body.encode(), raw[4:])
        except (BadSignatureError, ValueError):
            raise CheckpointError("the checkpoint's signature does not verify") from None
        origin, size, root = body.rstrip("\n").split("\n")
        return origin, int(size), base64.b64decode(root, validate=True)
    raise CheckpointError(f"no signature by {name!r} on the checkpoint")


BATCH_PREFIX = b"grifo-attestation-batch/v1\n"


def batch_statement(size: int, root: bytes) -> bytes:
    """What one signature over a batch of attestations signs (see `batch.py`)."""
    return BATCH_PREFIX + f"{size}\n{base64.b64encode(root).decode()}\n".encode()


def verify_attestation(token: str, public: VerifyKey) -> Claims:
    """The claims of an attestation, signed alone or in a batch (see `batch.py`)."""
    payload_b64, signature_b64, proof_b64 = [*token.split("."), "", ""][:3]
    if not proof_b64:
        return msgspec.json.decode(_verified(token, public), type=Claims)
    payload, proof = _unb64url(payload_b64), _unb64url(proof_b64)
    if token.count(".") != 2 or len(proof) < 8 or (len(proof) - 8) % 32:
        raise CheckpointError("a batch attestation is <claims>.<signature>.<proof>")
    index, size = int.from_bytes(proof[:4], "big"), int.from_bytes(proof[4:8], "big")
    path = [proof[i : i + 32] for i in range(8, len(proof), 32)]
    root = root_from_inclusion(leaf_hash(payload), index, size, path)
    if root is None:
        raise CheckpointError("the attestation's batch proof does not fit its batch")
    try:
        public.verify(batch_statement(size, root), _unb64url(signature_b64))
    except (BadSignatureError, ValueError):
        raise CheckpointError("the token's signature does not verify") from None
    return msgspec.json.decode(payload, type=Claims)


def verify_receipt(token: str, public: VerifyKey) -> Receipt:
    return msgspec.json.decode(_verified(token, public), type=Receipt)


def _verified(token: str, public: VerifyKey) -> bytes:
    payload_b64, sep, signature_b64 = token.partition(".")
    if not sep:
        raise CheckpointError("a signed token is <claims>.<signature>")
    payload = _unb64url(payload_b64)
    try:
        public.verify(payload, _unb64url(signature_b64))
    except (BadSignatureError, ValueError):
        raise CheckpointError("the token's signature does not verify") from None
    return payload


def public_b64(public: VerifyKey) -> str:
    """The raw public key in base64 (as points publish it in /health)."""
    return base64.b64encode(bytes(public)).decode()


def public_from_b64(text: str) -> VerifyKey:
    try:
        return VerifyKey(base64.b64decode(text, validate=True))
    except ValueError:
        raise CheckpointError("not a base64 Ed25519 public key") from None


# The DER of an Ed25519 key in its one standard form (RFC 8410) is a fixed prefix and the 32
# key bytes: PKCS#8 v1 for the private key (the seed), SubjectPublicKeyInfo for the public one.
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def load_or_create(path: Path, name: str) -> Signer:
    """The signing key in `path` (PEM, PKCS#8), created on first use with mode 0600."""
    if path.exists():
        seed = _der_key(path.read_bytes(), "PRIVATE KEY", _PKCS8_PREFIX)
        if seed is None:
            seed = _library_private(path)
        return Signer(name, SigningKey(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(_pem("PRIVATE KEY", _PKCS8_PREFIX + bytes(key)).encode())
    return Signer(name, key)


def public_pem(public: VerifyKey) -> str:
    return _pem("PUBLIC KEY", _SPKI_PREFIX + bytes(public))


def load_public(pem: bytes) -> VerifyKey:
    raw = _der_key(pem, "PUBLIC KEY", _SPKI_PREFIX)
    if raw is None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError:
            raise CheckpointError("not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise CheckpointError("not an Ed25519 public key")
        raw = key.public_bytes_raw()
    return VerifyKey(raw)


def _pem(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n"


def _der_key(pem: bytes, label: str, prefix: bytes) -> bytes | None:
    """The 32 key bytes of a PEM block `label` holding `prefix` + key, else None: another
    form (a PKCS#8 v2 key with its public half, other text around it) is left to `cryptography`."""
    text = pem.decode("ascii", "replace").strip().splitlines()
    frame = (f"-----BEGIN {label}-----", f"-----END {label}-----")
    if len(text) < 3 or (text[0], text[-1]) != frame:
        return None
    try:
        der = base64.b64decode("".join(text[1:-1]), validate=True)
    except binascii.Error:
        return None
    if len(der) != len(prefix) + 32 or not der.startswith(prefix):
        return None
    return der[len(prefix) :]


def _library_private(path: Path) -> bytes:
    """The seed of a private key in a PEM form other than the plain one, read by `cryptography`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CheckpointError(f"{path} is not a readable PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{path} is not an Ed25519 private key")
    return key.private_bytes_raw()


def b64url(data: bytes) -> str:
    """base64url without padding (tokens, receipts)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise CheckpointError("not base64url") from None
