"""Export an audit log for an auditor, and verify an export offline with the public key.

An export is a directory: `records.jsonl` (per line `{"log", "seq", "record"}` with the
record's canonical JSON, or, for records outside the tenant or time window asked for, a stub
`{"log", "seq", "entry_hash", "leaf_hash"}` that keeps the chain and the tree checkable without
their content), `checkpoints.jsonl` (`{"log", "size", "note"}`), `public-key.pem` and a human
summary. `verify` reports every edited, deleted, inserted or reordered record it finds.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nacl.signing import VerifyKey

from grifo.audit import merkle
from grifo.audit.record import GENESIS, AuditRow, CheckpointRow, canonical, decode, entry_hash
from grifo.audit.signing import CheckpointError, verify_checkpoint, verify_receipt


class ExportLine(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    log: str
    seq: int
    record: str | None = None
    entry_hash: str | None = None
    leaf_hash: str | None = None


class ExportCheckpoint(msgspec.Struct, forbid_unknown_fields=True):
    log: str
    size: int
    note: str


@dataclass
class Report:
    logs: int = 0
    records: int = 0
    checkpoints: int = 0
    receipts: int = 0  # points' receipts checked against the points' keys
    unchecked: int = 0  # records without a receipt, or from a point whose key was not given
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def export(
    logs: Iterable[tuple[str, list[AuditRow], list[CheckpointRow]]],
    out: Path,
    public_pem: str,
    *,
    retired_pems: Sequence[str] = (),
    tenant: str | None = None,
    since_ms: int = 0,
    until_ms: int | None = None,
) -> int:
    """Write an export of `logs` to `out`; records outside the tenant or window become stubs.
    Returns the number of full records written."""
    out.mkdir(parents=True, exist_ok=True)
    full = 0
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    encoder = msgspec.json.Encoder()
    with (
        (out / "records.jsonl").open("wb") as records,
        (out / "checkpoints.jsonl").open("wb") as checkpoints,
    ):
        for name, rows, marks in logs:
            for row in rows:
                inside = (
                    bool(row.record)  # a record past retention keeps only its hashes
                    and (tenant is None or row.tenant == tenant)
                    and since_ms <= row.ts_ms
                    and (until_ms is None or row.ts_ms < until_ms)
                )
                if inside:
                    line = ExportLine(row.log, row.seq, record=row.record)
                    r = decode(row.record)
                    counts[r.jurisdiction, r.point, r.model] += 1
                    full += 1
                else:
                    line = ExportLine(
                        row.log, row.seq, entry_hash=row.entry_hash, leaf_hash=row.leaf_hash
                    )
                records.write(encoder.encode(line) + b"\n")
            for mark in marks:
                checkpoints.write(
                    encoder.encode(ExportCheckpoint(name, mark.size, mark.note)) + b"\n"
                )
    (out / "public-key.pem").write_text(public_pem)
    keys = out / "public-keys"  # every key that signed a checkpoint, retired ones too
    keys.mkdir(exist_ok=True)
    for n, pem in enumerate([public_pem, *retired_pems]):
        (keys / f"{n}.pem").write_text(pem)
    lines = [
        f"grifo audit export, {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"tenant: {tenant or 'all'}; records: {full}",
        "",
        f"{'jurisdiction':<14}{'point':<28}{'model':<32}{'requests':>10}",
    ]
    lines += [f"{j:<14}{p:<28}{m:<32}{n:>10,}" for (j, p, m), n in sorted(counts.items())]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return full


def verify(
    directory: Path,
    public: VerifyKey | Sequence[VerifyKey],
    key_name: str | None = None,
    point_keys: Mapping[str, VerifyKey] | None = None,
) -> Report:
    """Check every log in an export: sequence, canonical form, chain, checkpoints, and each
    record's point receipt against `point_keys` (point name → its public key)."""
    report = Report()
    by_log: dict[str, list[ExportLine]] = collections.defaultdict(list)
    with (directory / "records.jsonl").open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = msgspec.json.decode(raw, type=ExportLine)
            except msgspec.DecodeError:
                report.problems.append(f"records.jsonl line {number} is not a record")
                continue
            by_log[line.log].append(line)
    marks: dict[str, list[ExportCheckpoint]] = collections.defaultdict(list)
    path = directory / "checkpoints.jsonl"
    for raw in path.read_bytes().splitlines() if path.exists() else []:
        mark = msgspec.json.decode(raw, type=ExportCheckpoint)
        marks[mark.log].append(mark)
    for name, lines in sorted(by_log.items()):
        report.logs += 1
        report.records += len(lines)
        leaves = _check_chain(name, lines, report.problems)
        _check_receipts(name, lines, point_keys or {}, report)
        for mark in marks.get(name, []):
            report.checkpoints += 1
            _check_checkpoint(name, mark, leaves, public, key_name, report.problems)
    return report


def _check_chain(name: str, lines: list[ExportLine], problems: list[str]) -> list[bytes | None]:
    """Leaf hashes by position; reports order, canonical form and chain breaks."""
    leaves: list[bytes | None] = []
    prev: str | None = GENESIS
    breaks: set[int] = set()  # positions whose link to the record before does not hold
    misplaced: set[int] = set()
    for position, line in enumerate(lines):
        if line.seq != position:
            misplaced.add(position)
            kind = (
                "inserted or duplicated" if line.seq < position else "missing before it (deleted)"
            )
            problems.append(
                f"{name}: record {position} has seq {line.seq}: a record is {kind}, "
                "or the order changed"
            )
        if line.record is None:
            if line.entry_hash is None or line.leaf_hash is None:
                problems.append(f"{name}: stub {line.seq} lacks its hashes")
                leaves.append(None)
                prev = None
                continue
            leaves.append(bytes.fromhex(line.leaf_hash))
            prev = line.entry_hash
            continue
        data = line.record.encode()
        try:
            record = decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            problems.append(f"{name}: record {line.seq} is not a valid audit record (edited)")
            leaves.append(None)
            prev = None
            continue
        if canonical(record) != data or record.seq != line.seq or record.log != name:
            problems.append(f"{name}: record {line.seq} was edited (not as written)")
        if prev is not None and record.prev_hash != prev:
            breaks.add(position)
            problems.append(
                f"{name}: chain broken at record {line.seq}: the record before it was edited, "
                "deleted or moved, or this one was"
            )
        leaves.append(merkle.leaf_hash(data))
        prev = entry_hash(record.prev_hash, data)
    # A link into `position` that fails while the one out of it holds: `position` is as
    # written, so the record before it changed.
    problems.extend(
        f"{name}: record {lines[position - 1].seq} was edited"
        for position in sorted(breaks - misplaced)
        if position + 1 < len(lines)
        and position + 1 not in breaks
        and position - 1 not in misplaced
    )
    return leaves


def _check_receipts(
    name: str, lines: list[ExportLine], keys: Mapping[str, VerifyKey], report: Report
) -> None:
    """Every jurisdiction a record's request reached must be in its allowed set, and its point,
    jurisdiction, model and tokens must be what its point signed."""
    for line in lines:
        if line.record is None:
            continue
        try:
            record = decode(line.record.encode())
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # reported by the chain check
        reached = [record.jurisdiction] if record.jurisdiction else []
        reached += [hop.split(":")[1] for hop in record.tried if hop.count(":") >= 2]
        if record.allowed is not None and (outside := set(reached) - set(record.allowed)):
            report.problems.append(
                f"{name}: record {line.seq}: {record.request_id} reached "
                f"{', '.join(sorted(outside))}, outside its allowed set"
            )
        key = keys.get(record.point)
        if not record.point_receipt or key is None:
            report.unchecked += 1
            continue
        try:
            receipt = verify_receipt(record.point_receipt, key)
        except (CheckpointError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            report.problems.append(
                f"{name}: record {line.seq}: its point receipt is invalid ({exc})"
            )
            continue
        report.receipts += 1
        claimed = (record.request_id, record.point, record.jurisdiction, record.model)
        signed = (receipt.request_id, receipt.point, receipt.jurisdiction, receipt.model)
        tokens = (record.prompt_tokens, record.completion_tokens)
        if claimed != signed or tokens != (receipt.prompt_tokens, receipt.completion_tokens):
            report.problems.append(
                f"{name}: record {line.seq} says {record.point} ({record.jurisdiction}) ran "
                f"{record.request_id}; the point signed {receipt.point} ({receipt.jurisdiction}) "
                f"for {receipt.request_id}"
            )


def _check_checkpoint(
    name: str,
    mark: ExportCheckpoint,
    leaves: list[bytes | None],
    public: VerifyKey | Sequence[VerifyKey],
    key_name: str | None,
    problems: list[str],
) -> None:
    try:
        origin, size, root = verify_checkpoint(mark.note, key_name or name.split("/")[0], public)
    except (CheckpointError, ValueError) as exc:
        problems.append(f"{name}: checkpoint at {mark.size}: {exc}")
        return
    if origin != name or size != mark.size:
        problems.append(f"{name}: checkpoint at {mark.size} names {origin} at {size}")
    if size > len(leaves):
        problems.append(
            f"{name}: checkpoint covers {size} records, the export has {len(leaves)} "
            "(records at the end were deleted)"
        )
        return
    covered = leaves[:size]
    if any(leaf is None for leaf in covered):
        return  # already reported
    if merkle.root([leaf for leaf in covered if leaf is not None]) != root:
        problems.append(
            f"{name}: the first {size} records do not match their signed checkpoint "
            "(a record was edited, deleted, inserted or moved)"
        )
