"""A local append-only spool of records (ledger entries, audit records): what makes a metered
request survive a crash.

Every entry is appended before its response is sent, into a segment file mapped into memory
(`MAP_SHARED`): an append is a copy into the page cache, not a system call, and a process
killed at any point has the entry on disk (the kernel keeps a dead process's dirty pages of a
shared file mapping; power loss is out of scope). A segment's blocks are allocated when it is
opened (`posix_fallocate`), so a full disk is an error at rotation, never a SIGBUS on a write
into a hole. The pages written in the current segment (and the next one's, faulted in ahead,
below) count in the process's RSS until it rotates, so segments are small (1 MiB). The unused
tail of a segment is zeros: a closed segment is cut to what was written; a crashed process's
segment is read up to its first zero byte. A segment is deleted once all its entries are
committed to the database, and leftover segments are replayed at start (the ledger's primary
key makes a replay idempotent).

The thread that appends (the event loop) does no file work at a rotation when another thread
tidies the spool (`tidy`, the ledger's writer): that thread finishes the segments the
rotations closed and keeps the next one ready, opened, allocated and, once segments fill up,
with its pages faulted in. Opening and closing a segment took ~0.6 ms and first writes into a
new page ~4 us each (~1 ms a segment): a stall of the loop at every rotation, and about a
microsecond a request with the audit log's ~1 KB records (bench/README.md, "The spool's
file work").
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import sys
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
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a mapping's pages in, writable, in one call
_MAX_RETIRED = 8  # closed segments left for `tidy`; past that the rotation finishes them


class _File:
    """A segment file: allocated on disk (a full disk fails here, not at a write) and mapped."""

    __slots__ = ("fd", "map", "path")

    def __init__(self, path: Path, size: int, *, populate: bool = False) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self.fd, self.path = fd, path
        if populate and sys.platform == "linux":
            try:
                self.map.madvise(_MADV_POPULATE_WRITE)
            except OSError:  # an older kernel: the first write into each page faults it in
                pass

    def finish(self, used: int) -> None:
        """Unmap, and cut the file to the `used` bytes written."""
        self.map.close()
        os.ftruncate(self.fd, used)
        os.close(self.fd)

    def discard(self) -> None:
        """Unmap and delete a segment nothing was written to."""
        self.map.close()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class Spool(Generic[R]):
    """The current segment of one process; `append` returns a segment it closed, if any.

    Safe to share between the event loop (appends) and the ledger writer (which rotates when
    it must replay the current segment, and calls `tidy`)."""

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
        self._used = 0
        self._count = 0
        self._lock = threading.Lock()
        self._line = bytearray(512)
        self._closed = False
        self._spare: _File | None = None  # the next segment, made ready by `tidy`
        self._retired: list[tuple[_File, int | None]] = []  # closed, for `tidy`: (file, used)
        self._filling = False  # the last segment closed full: the next will fill up too
        self._file = _File(self._name(), segment_bytes)
        self._map = self._file.map
        self._opened = time.monotonic()
        self.segment = self._file.path

    def _name(self) -> Path:
        """A new segment's path: names sort in the order segments are started."""
        name = f"{self.kind}-{os.getpid()}-{time.time_ns()}-{next(self._serial)}.jsonl"
        return self.directory / name

    def append(self, entry: R) -> Path | None:
        """Append `entry`, or raise with nothing written (a full disk, at rotation)."""
        with self._lock:
            line = self._line
            _encoder.encode_into(entry, line)  # into a buffer kept for it: no bytes made
            line.append(0x0A)  # \n
            if self._closed:
                raise RuntimeError("append to a closed spool")
            closed = None
            if self._used + len(line) > len(self._map):  # the next segment holds it
                closed = self._rotate(max(self._segment_bytes, 2 * len(line)), full=True)
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
                    closed = self._rotate(self._segment_bytes, full=False)
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
                return self._rotate(self._segment_bytes, full=False)
            except OSError as exc:
                log.warning("spool %s: cannot start a segment (%s)", self.kind, exc)
                return None

    def _rotate(self, size: int, *, full: bool) -> Path:
        """Start the next segment (the spare, if one is ready and large enough); the closed
        one waits for `tidy`. On failure the current segment stays as it is."""
        spare = self._spare
        if spare is not None and size <= len(spare.map):
            new, self._spare = spare, None
        else:
            new = _File(self._name(), size)
            if spare is not None:  # started before `new`: it would sort before it
                self._spare = None
                self._retired.append((spare, None))
        closed = self._file
        self._retired.append((closed, self._used))
        self._file, self._map, self._used, self._count = new, new.map, 0, 0
        self._opened = time.monotonic()
        self._filling = full
        self.segment = new.path
        if len(self._retired) > _MAX_RETIRED:  # nobody tidies: do it here
            self._tidy(self._take_retired())
        return closed.path

    def _take_retired(self) -> list[tuple[_File, int | None]]:
        retired, self._retired = self._retired, []
        return retired

    @staticmethod
    def _tidy(retired: list[tuple[_File, int | None]]) -> None:
        for file, used in retired:
            if used is None:
                file.discard()
            else:
                file.finish(used)

    def tidy(self) -> None:
        """The file work of rotations, for a thread other than the appending one: finish the
        segments they closed, and make the next segment ready (its pages faulted in when
        segments fill up, rather than rotate on time)."""
        with self._lock:
            retired = self._take_retired()
            wanted = self._spare is None and not self._closed
            populate = self._filling
        self._tidy(retired)
        if not wanted:
            return
        try:
            spare = _File(self._name(), self._segment_bytes, populate=populate)
        except OSError as exc:  # a full disk: the appending thread will say so at rotation
            log.debug("spool %s: cannot prepare a segment (%s)", self.kind, exc)
            return
        with self._lock:
            if self._closed or self._spare is not None:
                spare.discard()
            else:
                self._spare = spare

    def close(self) -> Path:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._tidy(self._take_retired())
                self._file.finish(self._used)
                if self._spare is not None:
                    self._spare.discard()
                    self._spare = None
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
