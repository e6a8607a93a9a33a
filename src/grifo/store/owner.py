"""One `grifo serve` per state directory, and one process per audit log.

A state directory holds a gateway's spool and its audit log's instance id. A second gateway
started on the same directory would replay the first one's live spool segments as if they were
left by a crash, and both would append to one audit log: records with the same sequence number
collide, and the second of each is dropped. So the first process of `grifo serve` holds an
exclusive `flock` on `gateway.lock` for as long as it runs, and another finds it taken and stops
before it touches anything. The kernel lets go of a lock when its process ends, however it ends.

Its workers each append to a log of their own (`<gateway>/<instance>/<worker>`), and each holds a
lock of its own too: a worker of a gateway that was killed outlives it for a moment (it notices
within half a second, then lets its requests finish for up to 10 s), still appending to its log,
so the same worker of the next gateway waits for it to let go, and the next gateway waits for
all of them before it replays the spool.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "gateway.lock"
WORKER_WAIT_S = 30.0  # more than a worker's 10 s of grace, less than its start's 60 s


class StateDirInUseError(Exception):
    """Another running gateway holds this state directory."""


def claim(state_dir: Path) -> int:
    """Hold `state_dir` for this process: the descriptor that holds it, to close at the end."""
    path = state_dir / LOCK_FILE
    fd = _lock(path)
    if fd is None:
        raise StateDirInUseError(
            f"the state directory {state_dir} is in use by another grifo serve "
            f"(pid {_holder(path)}); give each gateway its own --state-dir, or run one with "
            "--workers N"
        )
    return fd


async def claim_worker(state_dir: Path, worker: int, wait_s: float = WORKER_WAIT_S) -> int:
    """Hold worker `worker`'s audit log, once the same worker of an earlier gateway (if one is
    still finishing) has let go: the descriptor that holds it, to close at the end."""
    path = state_dir / f"gateway-worker-{worker}.lock"
    deadline = time.monotonic() + wait_s
    while (fd := _lock(path)) is None:
        if time.monotonic() >= deadline:
            raise StateDirInUseError(
                f"worker {worker} of an earlier gateway on {state_dir} (pid {_holder(path)}) "
                f"still runs after {wait_s:.0f} s"
            )
        await asyncio.sleep(0.1)
    return fd


async def outlive_workers(state_dir: Path, wait_s: float = WORKER_WAIT_S) -> None:
    """Wait for the workers of an earlier gateway on `state_dir` to finish: the spool they may
    still write to is replayed at start, and their logs continued."""
    for path in sorted(state_dir.glob("gateway-worker-*.lock")):
        number = path.name.removeprefix("gateway-worker-").removesuffix(".lock")
        if number.isdigit():
            os.close(await claim_worker(state_dir, int(number), wait_s))


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, with our pid written in it; None
    if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
