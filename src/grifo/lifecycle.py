"""How `grifo serve` runs: it holds its state directory, starts the gateway (`serve.start`)
and its workers, announces itself, and runs until a signal or, for a worker, its parent's end.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import msgspec

from grifo.config.model import GrifoConfig
from grifo.serve import Running, start
from grifo.store.owner import claim, claim_worker, outlive_workers
from grifo.supervisor import stop_process


def _settle_heap() -> None:
    """Once started: what start-up made lives as long as the process, so the collector stops
    walking it (`gc.freeze`), and collects the young generation every 20,000 allocations
    rather than 700 (requests make short-lived objects, almost never cycles)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def banner(running: Running, host: str, workers: int = 1) -> str:
    scheme = "https" if running.gateway.config.tls is not None else "http"
    processes = f" ({workers} gateway processes)" if workers > 1 else ""
    lines = [f"grifo gateway on {scheme}://{host}:{running.port}/v1{processes}"]
    for p in running.gateway.points:
        state = "ready" if p.healthy else f"DOWN ({p.reason})"
        lines.append(
            f"  point {p.name:<20} {p.jurisdiction}  {p.config.tier:<8} "
            f"{'https' if p.tls else 'http'}://{p.host}:{p.port}  {state}"
        )
    if running.demo_keys:
        lines.append("demo API keys (also in demo-keys.json in the state directory):")
        lines += [f"  {tenant:<12} {key}" for tenant, key in running.demo_keys.items()]
    return "\n".join(lines)


async def serve(
    config: GrifoConfig, state_dir: Path, host: str, port: int, workers: int = 1
) -> None:
    """Run until SIGINT/SIGTERM. With `workers` > 1, more gateway processes share the port
    (SO_REUSEPORT) and the SQLite state; the kernel spreads connections across them."""
    stop = _stop_on_signals()  # before anything is announced: a quick SIGTERM must stop us
    owner = claim(state_dir)  # a second gateway on this directory stops here
    try:
        await outlive_workers(state_dir)  # of a gateway killed a moment ago
        await _serve_owned(config, state_dir, host, port, workers, stop)
    finally:
        os.close(owner)


async def _serve_owned(
    config: GrifoConfig, state_dir: Path, host: str, port: int, workers: int, stop: asyncio.Event
) -> None:
    running = await start(config, state_dir, host, port, reuse_port=workers > 1)
    extra: list[asyncio.subprocess.Process] = []
    try:
        urls = {
            p.name: f"{'https' if p.tls else 'http'}://{p.host}:{p.port}"
            for p in running.gateway.points
        }
        extra = await start_workers(config, state_dir, host, running.port, urls, workers - 1)
        _settle_heap()
        print(banner(running, host, workers), flush=True)
        await _until(stop, None)
    finally:
        print("grifo: stopping", file=sys.stderr, flush=True)
        await asyncio.gather(*(stop_process(w) for w in extra))
        await running.stop()


async def serve_worker(
    config: GrifoConfig,
    state_dir: Path,
    host: str,
    port: int,
    point_urls: Mapping[str, str],
    parent_pid: int,
    worker: int,
) -> None:
    stop = _stop_on_signals()
    own_log = await claim_worker(state_dir, worker)
    try:
        running = await start(
            config, state_dir, host, port, point_urls=point_urls, reuse_port=True, worker=worker
        )
        _settle_heap()
        print("ready", flush=True)
        try:
            await _until(stop, parent_pid)
        finally:
            await running.stop()
    finally:
        os.close(own_log)


class WorkerStartError(RuntimeError):
    """A worker of `serve --workers` exited or said something else than "ready"."""


async def start_workers(
    config: GrifoConfig, state_dir: Path, host: str, port: int, urls: dict[str, str], n: int
) -> list[asyncio.subprocess.Process]:
    args = [
        sys.executable,
        "-m",
        "grifo",
        "serve",
        "--config-json",
        msgspec.json.encode(config).decode(),
        "--point-urls",
        json.dumps(urls),
        "--host",
        host,
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--parent-pid",
        str(os.getpid()),
    ]
    started = []
    for index in range(1, n + 1):
        proc = await asyncio.create_subprocess_exec(
            *args,
            "--worker",
            str(index),
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        started.append(proc)
    for proc in started:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise WorkerStartError("a gateway worker did not start; see its stderr")
    return started


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _until(stop: asyncio.Event, parent_pid: int | None) -> None:
    """Return once `stop` is set, or when `parent_pid` is no longer our parent."""
    waiter = asyncio.get_running_loop().create_task(stop.wait())
    while not waiter.done():
        await asyncio.wait([waiter], timeout=0.5)
        if parent_pid is not None and os.getppid() != parent_pid:
            break
    waiter.cancel()
