"""Start local point processes for `grifo serve`, learn their ports, and stop them all.

Each point is `python -m grifo point --point-json ...` with its own log file; it prints one JSON
line with its port when listening, and exits by itself if the supervisor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from grifo.config.model import PointConfig


class PointStartError(RuntimeError):
    """A local point process exited or stayed silent instead of listening."""


@dataclass(slots=True)
class LocalPoint:
    config: PointConfig
    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"


class _Listening(msgspec.Struct):
    event: str
    port: int


async def start_point(
    config: PointConfig,
    log_dir: Path,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> LocalPoint:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{config.name}.log"
    args = [
        sys.executable,
        "-m",
        "grifo",
        "point",
        "--point-json",
        msgspec.json.encode(config).decode(),
        "--port",
        "0",
        "--parent-pid",
        str(os.getpid()),
        "--key-file",
        str(log_dir.parent / "points" / f"{config.name}.pem"),
    ]
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout_s)
        listening = msgspec.json.decode(line, type=_Listening)
    except (TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
        await stop_process(process)
        reason = _last_word(log_path)
        raise PointStartError(
            f"point {config.name} did not start{f' ({reason})' if reason else ''}; see {log_path}"
        ) from None
    return LocalPoint(config, process, listening.port, log_path)


def _last_word(log_path: Path) -> str:
    """The point's own last message in its log (`grifo: ...`), if its last line is one."""
    with contextlib.suppress(OSError), log_path.open("rb") as log:
        log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
        lines = log.read().decode(errors="replace").strip().splitlines()
        if lines and lines[-1].startswith("grifo: "):
            return lines[-1].removeprefix("grifo: ")
    return ""


async def start_points(
    configs: list[PointConfig], log_dir: Path, env: Mapping[str, str] | None = None
) -> list[LocalPoint]:
    """Start local points (with `env` added to their environment) and wait until they listen."""
    started = await asyncio.gather(
        *(start_point(c, log_dir, env=env) for c in configs), return_exceptions=True
    )
    points = [p for p in started if isinstance(p, LocalPoint)]
    errors = [e for e in started if isinstance(e, BaseException)]
    if errors:
        await stop_points(points)
        raise errors[0]
    return points


async def stop_process(process: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def stop_points(points: list[LocalPoint]) -> None:
    await asyncio.gather(*(stop_process(p.process) for p in points))
