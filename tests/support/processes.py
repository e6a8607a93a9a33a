"""`grifo serve` as a child process, the way a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def serve(
    config: Path, state: Path, env: Mapping[str, str] | None = None, workers: int | str = 1
) -> tuple[subprocess.Popen[str], int]:
    """Start `grifo serve --port 0 [--workers N]` and return it with the port its banner
    names."""
    proc, port, _ = serve_with_banner(config, state, env, workers)
    return proc, port


def serve_with_banner(
    config: Path, state: Path, env: Mapping[str, str] | None = None, workers: int | str = 1
) -> tuple[subprocess.Popen[str], int, str]:
    """`serve`, and the banner's first line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grifo",
            "serve",
            "--config",
            str(config),
            "--port",
            "0",
            "--state-dir",
            str(state),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=None if env is None else dict(env),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r":(\d+)/v1", line)
    assert match, "grifo serve did not start"
    return proc, int(match.group(1)), line
