"""Loaded by Python at start when this directory is on PYTHONPATH (`bench/stalls.py` puts it
there for the gateway it measures): once `grifo serve` has started, a task sleeps 1 ms in a loop
and appends to $GRIFO_STALL_PROBE each wake-up more than 4 ms late, in ms. Nothing of it is in
grifo; without the variable it does nothing."""

from __future__ import annotations

import asyncio
import os
import time

PATH = os.environ.get("GRIFO_STALL_PROBE")


async def _probe(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: ASYNC230, SIM115 (once, for the process's life)
    while True:
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        late = time.perf_counter() - start - 0.001
        if late > 0.004:
            out.write(f"{late * 1000:.1f}\n")


def _install() -> None:
    import grifo.lifecycle

    settle = grifo.lifecycle._settle_heap

    def settle_and_probe() -> None:
        settle()
        assert PATH is not None
        asyncio.get_running_loop().create_task(_probe(PATH))

    grifo.lifecycle._settle_heap = settle_and_probe


if PATH:
    _install()
