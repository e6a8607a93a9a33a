"""One `grifo serve` per state directory: a second one refuses to start, before it touches the
first one's spool or audit log, and says what to do instead."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from grifo.store.owner import StateDirInUseError, claim, claim_worker
from tests.support.fabric import topology_yaml
from tests.support.processes import serve


def test_a_claimed_directory_is_refused_until_its_holder_lets_go(tmp_path: Path) -> None:
    first = claim(tmp_path / "state")
    try:
        held = rf"in use by another grifo serve \(pid {os.getpid()}\)"
        with pytest.raises(StateDirInUseError, match=held):
            claim(tmp_path / "state")
        claim_elsewhere = claim(tmp_path / "other")  # another directory is free
        os.close(claim_elsewhere)
    finally:
        os.close(first)
    os.close(claim(tmp_path / "state"))  # let go: free again


def test_a_second_gateway_on_a_state_directory_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    state = tmp_path / "state"
    proc, port = serve(config, state)
    try:
        spool_before = sorted(p.name for p in (state / "spool").iterdir())
        args = ["serve", "--config", str(config), "--port", "0", "--state-dir", str(state)]
        second = subprocess.run(
            [sys.executable, "-m", "grifo", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert f"in use by another grifo serve (pid {proc.pid})" in second.stderr
        assert "--workers" in second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in (state / "spool").iterdir()) == spool_before
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200  # the first one serves on
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    again, _ = serve(config, state)  # stopped, it let go of the directory
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=30) == 0
    if again.stdout is not None:
        again.stdout.close()


def test_a_worker_waits_for_its_predecessor_to_let_go_of_its_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = asyncio.run(claim_worker(state, 1, wait_s=0))
    try:
        with pytest.raises(StateDirInUseError, match=rf"worker 1 .*\(pid {os.getpid()}\)"):
            asyncio.run(claim_worker(state, 1, wait_s=0.3))
        os.close(asyncio.run(claim_worker(state, 2, wait_s=0)))  # another worker's is free

        async def wait_then_hold() -> tuple[int, float]:
            fd = await claim_worker(state, 1, wait_s=10)
            return fd, time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(asyncio.run, wait_then_hold())
            time.sleep(0.5)
            assert not waiting.done()
            released = time.monotonic()
            os.close(held)
            fd, got = waiting.result(timeout=5)
        os.close(fd)
        assert got >= released
    finally:
        with contextlib.suppress(OSError):
            os.close(held)


def _banner_once_let_go(tmp_path: Path, held_worker: int, workers: int) -> str:
    """Start `grifo serve --workers {workers}` while this test holds worker `held_worker`'s
    lock, as an earlier gateway's worker would: the gateway must not announce itself until the
    lock is let go, and must then. Its banner's first line."""
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    state = tmp_path / "state"
    held = asyncio.run(claim_worker(state, held_worker, wait_s=0))
    args = ["serve", "--config", str(config), "--port", "0", "--state-dir", str(state)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "grifo", *args, "--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 4.0)
        assert not ready, f"the gateway started while worker {held_worker}'s lock was held"
        os.close(held)
        ready, _, _ = select.select([proc.stdout], [], [], 60.0)
        assert ready, "the gateway did not start once the lock was let go"
        return proc.stdout.readline()
    finally:
        with contextlib.suppress(OSError):
            os.close(held)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_waits_for_an_earlier_gateways_worker_to_finish(tmp_path: Path) -> None:
    """A worker of a gateway killed a moment ago still appends to its audit log: the next
    gateway's worker of the same number starts once it has let go."""
    assert "(2 gateway processes)" in _banner_once_let_go(tmp_path, held_worker=1, workers=2)


def test_serve_waits_for_the_workers_of_a_gateway_killed_a_moment_ago(tmp_path: Path) -> None:
    """Before it replays the spool, a gateway waits for the last one's workers to finish, even
    one it will not start itself (worker 3 of a bigger gateway)."""
    banner = _banner_once_let_go(tmp_path, held_worker=3, workers=1)
    assert "grifo gateway on http://127.0.0.1:" in banner
