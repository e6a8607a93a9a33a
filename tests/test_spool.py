"""The spool: appends land in a mapped segment that a crash cannot lose."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
from pathlib import Path

import msgspec
import pytest

from grifo.store.spool import Spool, read_segment, segments


class Row(msgspec.Struct):
    n: int
    text: str = ""


def _append_then_die(directory: str, count: int) -> None:
    spool: Spool[Row] = Spool(Path(directory), "t", segment_bytes=8 * 1024)
    for n in range(count):
        spool.append(Row(n))
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no unmap


def test_a_killed_process_leaves_every_appended_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_append_then_die, args=(str(tmp_path), 3000))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    found = [row.n for path in segments(tmp_path, "t") for row in read_segment(path, Row)]
    assert found == list(range(3000))  # several segments, in order, none lost or doubled


def test_closed_segments_are_cut_to_what_was_written(tmp_path: Path) -> None:
    spool: Spool[Row] = Spool(tmp_path, "t", segment_bytes=4096)
    spool.append(Row(1, "a"))
    spool.append(Row(2, "b"))
    path = spool.close()
    assert path.read_bytes() == b'{"n":1,"text":"a"}\n{"n":2,"text":"b"}\n'
    assert spool.rotate() is None


def test_a_full_segment_rotates_and_an_oversized_entry_gets_its_own(tmp_path: Path) -> None:
    spool: Spool[Row] = Spool(tmp_path, "t", segment_bytes=100)
    closed = [spool.append(Row(n, "x" * 30)) for n in range(3)]
    assert closed[0] is None
    assert closed[1] is None
    assert closed[2] is not None
    big = Row(3, "y" * 500)
    assert spool.append(big) is not None
    huge = Row(4, "z" * 100_000)  # past the line buffer the spool keeps
    spool.append(huge)
    spool.append(Row(5, "w"))
    spool.close()
    rows = [row for path in segments(tmp_path, "t") for row in read_segment(path, Row)]
    assert [row.n for row in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[3:] == [big, huge, Row(5, "w")]


def test_a_line_cut_short_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t-1-1-0.jsonl"
    path.write_bytes(b'{"n":1}\n{"n":2,"te' + b"\0" * 64)
    assert [row.n for row in read_segment(path, Row)] == [1]


def test_a_full_disk_refuses_the_entry_whole_and_the_spool_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool: Spool[Row] = Spool(tmp_path, "t", segment_bytes=64, rotate_entries=2)
    real = os.posix_fallocate

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool.append(Row(1))
    monkeypatch.setattr(os, "posix_fallocate", full)
    # due to rotate by count: the entry is written, the rotation waits
    assert spool.append(Row(2)) is None
    with pytest.raises(OSError, match="No space"):
        spool.append(Row(3, "x" * 80))  # needs a new segment: refused, nothing written
    assert spool.rotate() is None  # the writer's rotation waits too
    monkeypatch.setattr(os, "posix_fallocate", real)
    spool.append(Row(4, "y" * 80))
    spool.close()
    rows = [row.n for path in segments(tmp_path, "t") for row in read_segment(path, Row)]
    assert rows == [1, 2, 4]


def test_a_tidied_spool_rotates_without_file_work_and_finishes_closed_segments_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool: Spool[Row] = Spool(tmp_path, "t", segment_bytes=4096)
    spool.tidy()  # the writer's side: the next segment made ready
    first = spool.segment

    def no_file_work(*args: object) -> None:
        raise AssertionError("file work in the appending thread")

    monkeypatch.setattr(os, "posix_fallocate", no_file_work)
    monkeypatch.setattr(os, "ftruncate", no_file_work)
    closed = None
    n = written = 0
    while closed is None:
        row = Row(n, "x" * 100)
        closed = spool.append(row)
        if closed is None:
            written += len(msgspec.json.encode(row)) + 1
        n += 1
    assert closed == first
    assert first.stat().st_size == 4096  # still whole: the writer cuts it
    monkeypatch.undo()
    spool.tidy()
    assert first.stat().st_size == written
    assert [row.n for row in read_segment(first, Row)] == list(range(n - 1))
    spool.close()
    rows = [row.n for path in segments(tmp_path, "t") for row in read_segment(path, Row)]
    assert rows == list(range(n))


def test_segments_stay_in_order_and_a_closed_spool_leaves_no_spare(tmp_path: Path) -> None:
    spool: Spool[Row] = Spool(tmp_path, "t", segment_bytes=256)
    expected = []
    for n in range(60):
        # an entry larger than a segment now and then: a segment of its own, started while
        # a spare waits (which would sort before it, so it is dropped)
        row = Row(n, "y" * (600 if n % 17 == 5 else 20))
        spool.append(row)
        expected.append(row)
        if n % 3 == 0:
            spool.tidy()
    spool.tidy()
    spool.close()
    found = segments(tmp_path, "t")
    rows = [row for path in found for row in read_segment(path, Row)]
    assert rows == expected
    assert all(path.stat().st_size > 0 for path in found)  # no empty spare left behind


def test_rotations_without_tidy_finish_closed_segments_themselves(tmp_path: Path) -> None:
    spool: Spool[Row] = Spool(tmp_path, "t", segment_bytes=100)
    for n in range(40):  # two rows a segment, no one tidying
        spool.append(Row(n, "z" * 25))
    cut = [path for path in segments(tmp_path, "t") if path.stat().st_size < 100]
    assert len(cut) >= 8  # most closed segments are already cut to what they hold
    spool.close()
    rows = [row.n for path in segments(tmp_path, "t") for row in read_segment(path, Row)]
    assert rows == list(range(40))
