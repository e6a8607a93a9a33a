"""One audit record per request: what ran where, for whom, at what cost, and hashes (not
content) of what went in and came out.

The record's canonical form is its JSON encoding (fields in this order, no spaces). Records of
one log are chained, `entry_hash = SHA-256(prev_hash ‖ canonical)`, and are the leaves of the
log's Merkle tree (`merkle.py`). Field list and what each serves (EU AI Act Art. 12(2): events
for risk identification, post-market monitoring and the deployer's monitoring of operation):

- log, seq, prev_hash: completeness and order (no gaps, no reordering);
- request_id, received_ms, done_ms: the event and its start and end time; first_token_ms:
  when a stream's (or an agent run's) first output passed the gateway (absent for whole
  answers, whose output arrives at once);
- tenant, key_id (never the key): who used the system;
- endpoint, model: what was used;
- point, site, jurisdiction, allowed, data_class, redacted: where processing happened, where
  the request's data class allowed it to, and what personal data was redacted first;
- status, prompt_tokens, completion_tokens, cost_micros: the outcome;
- input_hmac, output_hmac: HMAC-SHA-256 with a per-tenant key of the request and response
  bodies, so a tenant can prove what was sent without the log holding it;
- policy: a digest of the configuration the decision was made under;
- tried: the attempts on other points before the one that answered (retries, hedges that lost),
  as `point:jurisdiction:outcome`, so every place the request reached is on record;
- point_receipt: the point's own signed receipt (`signing.Receipt`), which the gateway cannot
  forge: where the point says it ran, checked against the point's key by `grifo audit verify`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NamedTuple

import msgspec

GENESIS = "0" * 64


class AuditRecord(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Fields added later have defaults and are left out when default, so records written
    before them keep their canonical form."""

    log: str
    seq: int
    prev_hash: str
    request_id: str
    received_ms: int
    done_ms: int
    tenant: str
    key_id: str
    endpoint: str
    model: str
    point: str
    site: str
    jurisdiction: str
    allowed: list[str] | None
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    input_hmac: str
    output_hmac: str
    policy: str
    point_receipt: str = ""
    data_class: str = ""
    redacted: str = ""
    tried: list[str] = []
    first_token_ms: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AuditRecord)


def canonical(record: AuditRecord) -> bytes:
    return _encoder.encode(record)


def decode(data: bytes | str) -> AuditRecord:
    return _decoder.decode(data)


def entry_hash(prev_hash: str, canonical_bytes: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical_bytes).hexdigest()


def tenant_key(master: bytes, tenant: str) -> bytes:
    """The tenant's own HMAC key, derived from the gateway's audit secret."""
    return hmac.new(master, b"grifo-audit-tenant\0" + tenant.encode(), hashlib.sha256).digest()


class AuditRow(NamedTuple):
    """A record as stored: the canonical JSON and its hashes, plus columns to find it by."""

    log: str
    seq: int
    request_id: str
    tenant: str
    ts_ms: int
    record: str
    entry_hash: str
    leaf_hash: str


class CheckpointRow(NamedTuple):
    """A signed checkpoint of a log at `size` records, and the Merkle peaks at that size (so a
    restarted gateway continues the tree without reading every leaf)."""

    log: str
    size: int
    ts_ms: int
    note: str
    peaks: str  # hex peak hashes, comma-separated
