"""The audit log of one gateway process: a hash chain of records, a Merkle tree over them, and
signed checkpoints, written like the ledger (spool first, then batches to the database).

Each process appends to a log of its own (`<gateway name>/<state dir id>/<worker>`), so
sequence numbers are assigned without coordination; a restarted process continues its log from
the database (the last checkpoint's Merkle peaks plus the records after it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from grifo.audit.merkle import CompactRange, leaf_hash
from grifo.audit.record import (
    GENESIS,
    AuditRecord,
    AuditRow,
    CheckpointRow,
    canonical,
    tenant_key,
)
from grifo.audit.signing import Claims, Signer
from grifo.store.audit_sql import AuditTables, CheckpointSink, RecordSink
from grifo.store.ledger import RecordWriter
from grifo.store.spool import read_segment, segments

if TYPE_CHECKING:
    from grifo.exchange import Exchange
    from grifo.topology import PointState

log = logging.getLogger("grifo.audit")


class AuditLogError(RuntimeError):
    """The stored log is not a contiguous chain: it cannot be continued."""


def replay_audit_spool(open_tables: Callable[[], AuditTables], spool_dir: Path) -> int:
    """Commit audit records and checkpoints left in the spool by an earlier run."""
    tables = open_tables()
    replayed = 0
    try:
        for path in segments(spool_dir, "audit"):
            rows = list(read_segment(path, AuditRow))
            if rows:
                tables.write_records(rows)
            replayed += len(rows)
            path.unlink()
        for path in segments(spool_dir, "checkpoint"):
            checkpoints = list(read_segment(path, CheckpointRow))
            if checkpoints:
                tables.write_checkpoints(checkpoints)
            path.unlink()
    finally:
        tables.close()
    return replayed


class AuditLog:
    def __init__(
        self,
        name: str,
        signer: Signer,
        open_tables: Callable[[], AuditTables],
        spool_dir: Path,
        hmac_master: bytes,
        policy: str,
        *,
        checkpoint_every: int = 1000,
    ) -> None:
        self.name = name
        self.signer = signer
        self._master = hmac_master
        self.policy = policy  # a digest of the configuration decisions are made under
        self._every = checkpoint_every
        self._keys: dict[str, hmac.HMAC] = {}  # each tenant's HMAC, keyed once
        self._range, prev = _head(open_tables, name)
        self._prev = bytes.fromhex(prev)
        self._checkpointed = self._range.size
        self._started = self._range.size  # the log continues what earlier runs appended
        self._records: RecordWriter[AuditRow] = RecordWriter(
            lambda: RecordSink(open_tables()), spool_dir, AuditRow, "audit"
        )
        self._checkpoints: RecordWriter[CheckpointRow] = RecordWriter(
            lambda: CheckpointSink(open_tables()), spool_dir, CheckpointRow, "checkpoint"
        )
        self.recent: deque[AuditRecord] = deque(maxlen=50)  # the tail, for the dashboard

    @property
    def size(self) -> int:
        return self._range.size

    def append(
        self,
        ex: Exchange,
        point: PointState | None,
        usage: tuple[int, int],
        status: str,
        cost: int,
        output: bytes | None = None,
    ) -> AuditRecord:
        """The record of a request (see `record.py` for the fields); `point` is where it ran or
        was sent, None when it was refused before reaching one. `output` (default the
        request's answer) is what `output_hmac` proves: an agent step's event."""
        tenant = ex.principal.tenant
        key = self._keys.get(tenant)
        if key is None:
            key = self._keys[tenant] = hmac.new(tenant_key(self._master, tenant), None, "sha256")
        now_ns = time.time_ns()
        wall = now_ns - time.monotonic_ns()  # add to a monotonic time for the wall-clock time
        record = AuditRecord(
            log=self.name,
            seq=self._range.size,
            prev_hash=self._prev.hex(),
            request_id=ex.request_id,
            received_ms=(wall + ex.received_ns) // 1_000_000,
            done_ms=now_ns // 1_000_000,
            tenant=tenant,
            key_id=ex.principal.key_id,
            endpoint=ex.endpoint,
            model=ex.model,
            point="" if point is None else point.name,
            site="" if point is None else point.config.site,
            jurisdiction="" if point is None else point.jurisdiction,
            allowed=None if ex.allowed is None else sorted(ex.allowed),
            status=status,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            cost_micros=cost,
            input_hmac=_hmac_of(key, ex.body),
            output_hmac=_hmac_of(key, ex.answer if output is None else output),
            policy=self.policy,
            point_receipt=ex.point_receipt,
            data_class=ex.data_class,
            redacted=ex.redacted,
            tried=[f"{p.name}:{p.jurisdiction}:{outcome}" for p, outcome in ex.tried or ()],
            first_token_ms=(wall + ex.first_token_ns) // 1_000_000 if ex.first_token_ns else 0,
        )
        data = canonical(record)
        entry = hashlib.sha256(self._prev + data).digest()  # `record.entry_hash`, as bytes
        leaf = leaf_hash(data)
        row = AuditRow(
            record.log,
            record.seq,
            record.request_id,
            tenant,
            record.done_ms,
            data.decode(),
            entry.hex(),
            leaf.hex(),
        )
        self._prev = entry
        self._range.append(leaf)
        self._records.record(row)
        self.recent.append(record)
        if self._range.size - self._checkpointed >= self._every:
            self.checkpoint()
        return record

    def claims(self, record: AuditRecord) -> Claims:
        """What the attestation of `record`'s request states."""
        return Claims(
            request_id=record.request_id,
            point=record.point,
            jurisdiction=record.jurisdiction,
            model=record.model,
            log=record.log,
            seq=record.seq,
            ts_ms=record.done_ms,
        )

    def checkpoint(self) -> None:
        """Sign the tree as it stands (if it grew since the last checkpoint)."""
        size = self._range.size
        if size == self._checkpointed:
            return
        note = self.signer.sign_checkpoint(self.name, size, self._range.root())
        peaks = ",".join(p.hex() for p in self._range.peaks)
        self._checkpoints.record(
            CheckpointRow(self.name, size, int(time.time() * 1000), note, peaks)
        )
        self._checkpointed = size

    @property
    def appended(self) -> int:
        """Records this process appended (for `/metrics`)."""
        return self._range.size - self._started

    @property
    def up(self) -> bool:
        """Whether the database took the last records and checkpoints written to it."""
        return self._records.up and self._checkpoints.up

    @property
    def pending_segments(self) -> int:
        """Spool segments holding records or checkpoints that wait for the database."""
        return self._records.pending_segments + self._checkpoints.pending_segments

    def close(self) -> None:
        self.checkpoint()
        self._records.close()
        self._checkpoints.close()


def _head(open_tables: Callable[[], AuditTables], name: str) -> tuple[CompactRange, str]:
    """The Merkle range and last entry hash of log `name` as stored."""
    tables = open_tables()
    try:
        last = tables.last_checkpoint(name)
        size = 0 if last is None else last.size
        peaks = [bytes.fromhex(p) for p in last.peaks.split(",") if p] if last else []
        tree = CompactRange(size, peaks)
        prev = GENESIS
        for row in tables.records_from(name, max(size - 1, 0)):
            if row.seq >= size:
                if row.seq != tree.size:
                    raise AuditLogError(f"audit log {name} has a gap before record {row.seq}")
                tree.append(bytes.fromhex(row.leaf_hash))
            elif row.seq != size - 1:
                raise AuditLogError(f"audit log {name} lacks record {size - 1}")
            prev = row.entry_hash
        if size and prev == GENESIS:
            raise AuditLogError(f"audit log {name} lacks record {size - 1}")
        return tree, prev
    finally:
        tables.close()


def _hmac_of(key: hmac.HMAC, content: bytes | None) -> str:
    """HMAC-SHA-256 of `content` under the tenant's key (`key`, keyed once: a copy of it costs
    about half as much as keying a new one for each call)."""
    if content is None:
        return ""
    mac = key.copy()
    mac.update(content)
    return mac.hexdigest()
