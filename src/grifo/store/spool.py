"""A local append-only spool of records (ledger entries, audit records): what makes a metered
request survive a crash.

Every entry is appended before its response is sent, into a segment file mapped into memory
(`MAP_SHARED`): an append is a copy into the page cache, not a system call, and a process
killed at any point has the entry on disk (the kernel keeps a dead process's dirty pages of a
shared file mapping; power loss is out of scope). A segment's blocks are allocated when it is
opened (`posix_fallocate`), so a full disk is an error at rotation, never a SIGBUS on a write
into a hole. The pages written in the current segment count in the process's RSS until it
rotates, so segments are small (1 MiB). The unused tail of a segment is zeros: a closed
segment is cut to what was written; a crashed process's segment is read up to its first zero
byte. A segment is deleted once all its entries are committed to the database, and leftover
segments are replayed at start (the ledger's primary key makes a replay idempotent).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

R = TypeVar("R")
_encoder = msgspec.json.Encoder()
SEGMENT_BYTES = 1024 * 1024  # mapped pages count in the RSS: a small segment keeps that small


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
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.kind = kind
        self._rotate_entries = rotate_entries
        self._rotate_s = rotate_s
        self._segment_bytes = segment_bytes
        self._serial = itertools.count()
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._used = 0
        self._count = 0
        self._opened = 0.0
        self._lock = threading.Lock()
        self.segment = self._open(segment_bytes)

    def _open(self, size: int) -> Path:
        name = f"{self.kind}-{os.getpid()}-{time.time_ns()}-{next(self._serial)}.jsonl"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._used, self._count, self._opened = fd, 0, 0, time.monotonic()
        return path

    def append(self, entry: R) -> Path | None:
        line = _encoder.encode(entry) + b"\n"
        with self._lock:
            closed = None
            end = self._used + len(line)
            assert self._map is not None, "append to a closed spool"
            if end > len(self._map):  # does not fit: the next segment holds it
                closed = self._rotate(max(self._segment_bytes, 2 * len(line)))
                end = len(line)
            self._map[self._used : end] = line
            self._used = end
            self._count += 1
            if closed is not None or (
                self._count < self._rotate_entries
                and time.monotonic() - self._opened < self._rotate_s
            ):
                return closed
            return self._rotate(self._segment_bytes)

    def rotate(self) -> Path | None:
        """Close the current segment (returned) and start a new one; None once closed."""
        with self._lock:
            return None if self._fd < 0 else self._rotate(self._segment_bytes)

    def _rotate(self, size: int) -> Path:
        closed = self._finish()
        self.segment = self._open(size)
        return closed

    def _finish(self) -> Path:
        """Unmap the current segment and cut it to what was written."""
        assert self._map is not None
        self._map.close()
        self._map = None
        os.ftruncate(self._fd, self._used)
        os.close(self._fd)
        self._fd = -1
        return self.segment

    def close(self) -> Path:
        with self._lock:
            return self.segment if self._fd < 0 else self._finish()


def segments(directory: Path, kind: str = "ledger") -> list[Path]:
    return sorted(directory.glob(f"{kind}-*.jsonl")) if directory.is_dir() else []


_decoders: dict[Any, Any] = {}


def read_segment(path: Path, record_type: type[R]) -> Iterator[R]:
    """Entries of a segment, up to the zeros a crashed process left unwritten; a line cut
    short by a crash is skipped."""
    decoder: msgspec.json.Decoder[R] = _decoders.setdefault(
        record_type, msgspec.json.Decoder(record_type)
    )
    data = path.read_bytes()
    end = data.find(b"\0")
    for line in data[: None if end < 0 else end].splitlines():
        try:
            yield decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
