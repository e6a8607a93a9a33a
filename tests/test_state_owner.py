"""One `grifo serve` per state directory: a second one refuses to start, before it touches the
first one's spool or audit log, and says what to do instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from grifo.store.owner import StateDirInUseError, claim
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
