"""One `grifo serve` per state directory.

A state directory holds a gateway's spool and its audit log's instance id. A second gateway
started on the same directory would replay the first one's live spool segments as if they were
left by a crash, and both would append to one audit log: records with the same sequence number
collide, and the second of each is dropped. So the first process of `grifo serve` holds an
exclusive `flock` on `gateway.lock` for as long as it runs (its workers run under it, each with a
log of its own), and another finds it taken and stops before it touches anything. The kernel lets
go of the lock when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "gateway.lock"


class StateDirInUseError(Exception):
    """Another running gateway holds this state directory."""


def claim(state_dir: Path) -> int:
    """Hold `state_dir` for this process: the descriptor that holds it, to close at the end."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirInUseError(
            f"the state directory {state_dir} is in use by another grifo serve (pid {holder}); "
            "give each gateway its own --state-dir, or run one with --workers N"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
