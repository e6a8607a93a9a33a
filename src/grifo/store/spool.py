"""A local append-only spool of records (ledger entries, audit records): what makes a metered
request survive a crash.

Every entry is appended (one `write()` to an O_APPEND file) before its response is sent, so a
process killed at any point has the entry on disk (in the page cache; power loss is out of
scope). Segments rotate; a segment is deleted once all its entries are committed to the
database, and leftover segments are replayed at start (the ledger's primary key makes a replay
idempotent).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

R = TypeVar("R")
_encoder = msgspec.json.Encoder()


class Spool(Generic[R]):
    """The current segment of one process; `append` returns a segment it closed, if any.

    Safe to share between the event loop (appends) and the ledger writer (which rotates when
    it must replay the current segment)."""

    def __init__(
        self,
        directory: Path,
        kind: str = "ledger",
        *,
        rotate_entries: int = 20_000,
        rotate_s: float = 2.0,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.kind = kind
        self._rotate_entries = rotate_entries
        self._rotate_s = rotate_s
        self._serial = itertools.count()
        self._fd = -1
        self._count = 0
        self._opened = 0.0
        self._lock = threading.Lock()
        self.segment = self._open()

    def _open(self) -> Path:
        name = f"{self.kind}-{os.getpid()}-{time.time_ns()}-{next(self._serial)}.jsonl"
        path = self.directory / name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._count, self._opened = 0, time.monotonic()
        return path

    def append(self, entry: R) -> Path | None:
        line = _encoder.encode(entry) + b"\n"
        with self._lock:
            os.write(self._fd, line)
            self._count += 1
            if (
                self._count < self._rotate_entries
                and time.monotonic() - self._opened < self._rotate_s
            ):
                return None
            return self._rotate()

    def rotate(self) -> Path | None:
        """Close the current segment (returned) and start a new one; None once closed."""
        with self._lock:
            return None if self._fd < 0 else self._rotate()

    def _rotate(self) -> Path:
        os.close(self._fd)
        closed, self.segment = self.segment, self._open()
        return closed

    def close(self) -> Path:
        with self._lock:
            os.close(self._fd)
            self._fd = -1
            return self.segment


def segments(directory: Path, kind: str = "ledger") -> list[Path]:
    return sorted(directory.glob(f"{kind}-*.jsonl")) if directory.is_dir() else []


_decoders: dict[Any, Any] = {}


def read_segment(path: Path, record_type: type[R]) -> Iterator[R]:
    """Entries of a segment; a line cut short by a crash is skipped."""
    decoder: msgspec.json.Decoder[R] = _decoders.setdefault(
        record_type, msgspec.json.Decoder(record_type)
    )
    with path.open("rb") as handle:
        for line in handle:
            try:
                yield decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
