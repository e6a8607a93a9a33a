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
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

R = TypeVar("R")
log = logging.getLogger("grifo.spool")
_encoder = msgspec.json.Encoder()
_KEPT_LINE_BYTES = 64 * 1024
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
        self._line = bytearray(512)
        self._closed = False
        self.segment = self._open(segment_bytes)

    def _open(self, size: int) -> Path:
        """Start a new segment of `size` bytes; on failure the current one stays as it is."""
        name = f"{self.kind}-{os.getpid()}-{time.time_ns()}-{next(self._serial)}.jsonl"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if self._map is not None:
            self._finish()
        self._map, self._fd, self._used, self._count = mapped, fd, 0, 0
        self._opened = time.monotonic()
        return path

    def append(self, entry: R) -> Path | None:
        """Append `entry`, or raise with nothing written (a full disk, at rotation)."""
        with self._lock:
            line = self._line
            _encoder.encode_into(entry, line)  # into a buffer kept for it: no bytes made
            line.append(0x0A)  # \n
            if self._closed:
                raise RuntimeError("append to a closed spool")
            closed = None
            assert self._map is not None
            if self._used + len(line) > len(self._map):  # the next segment holds it
                closed = self._rotate(max(self._segment_bytes, 2 * len(line)))
            end = self._used + len(line)
            self._map[self._used : end] = line
            self._used = end
            if len(line) > _KEPT_LINE_BYTES:  # a rare large record: don't hold its memory
                self._line = bytearray(512)
            self._count += 1
            due = self._count >= self._rotate_entries or (
                time.monotonic() - self._opened >= self._rotate_s
            )
            if closed is None and due:
                try:
                    closed = self._rotate(self._segment_bytes)
                except OSError as exc:  # the entry is written: rotate later
                    log.warning("spool %s: cannot start a segment (%s)", self.kind, exc)
                    self._opened = time.monotonic()
            return closed

    def rotate(self) -> Path | None:
        """Close the current segment (returned) and start a new one; None once closed, or
        when no new segment can be started now (the current one stays)."""
        with self._lock:
            if self._closed:
                return None
            try:
                return self._rotate(self._segment_bytes)
            except OSError as exc:
                log.warning("spool %s: cannot start a segment (%s)", self.kind, exc)
                return None

    def _rotate(self, size: int) -> Path:
        closed = self.segment
        self.segment = self._open(size)
        return closed

    def _finish(self) -> None:
        """Unmap the current segment and cut it to what was written."""
        assert self._map is not None
        self._map.close()
        self._map = None
        os.ftruncate(self._fd, self._used)
        os.close(self._fd)
        self._fd = -1

    def close(self) -> Path:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._finish()
            return self.segment


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
