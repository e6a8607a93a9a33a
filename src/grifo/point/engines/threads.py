"""How many threads a llama.cpp engine decodes with when its config says `threads: auto`.

The count that decodes fastest on this host, measured once: a host with many free cores wants
many (SmolLM2 on 16 cores: 43-45 tokens/s on 1 thread, 280-330 on 16), a small or busy one few (on
2 shared cores 1 thread was steadier than 2). The engine times a full batch step (every slot
decoding) with each candidate count; the answer is remembered in a small JSON file per model
file, batch width and CPU count, so later starts on the same host skip the measurement.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARGIN = 0.05
"""More threads must be this much faster than fewer to be chosen: threads that buy a few percent
take CPU that the gateway and other points on the host would use better."""


def candidates(cpus: int) -> list[int]:
    """Thread counts worth trying on `cpus` CPUs: powers of two below it, and all of them."""
    counts = [1 << i for i in range(cpus.bit_length()) if 1 << i < cpus]
    return [*counts, max(cpus, 1)]


class StepTimer:
    """Times a step decoding one token in each of `width` sequences of a llama.cpp context,
    before its engine starts (the tokens are dropped from the cache after)."""

    def __init__(self, capi: Any, ctx: Any, batch: Any, width: int, token: int) -> None:
        self._capi, self._ctx, self._batch = capi, ctx, batch
        self._width, self._token = width, token

    def seconds(self, threads: int) -> float:
        """Median of six steps after two warm-ups (caches, the thread team), fewer for a model
        slow enough that they would take over a second."""
        capi, batch, times = self._capi, self._batch, []
        capi.llama_set_n_threads(self._ctx.ctx, threads, threads)
        token = capi.llama_vocab_bos(
            capi.llama_model_get_vocab(capi.llama_get_model(self._ctx.ctx))
        )
        for step in range(8):
            for seq in range(self._width):
                batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = token, step, 1
                batch.seq_id[seq][0], batch.logits[seq] = seq, True
            batch.n_tokens = self._width
            start = time.perf_counter()
            if capi.llama_decode(self._ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while timing thread counts")
            if step >= 2:
                times.append(time.perf_counter() - start)
                if len(times) >= 2 and sum(times) > 1.0:
                    break
        capi.llama_memory_clear(self._ctx.memory, True)
        return statistics.median(times)


def measure(step_seconds: Callable[[int], float], options: Sequence[int]) -> dict[int, float]:
    """Each option's step time, smallest count first."""
    return {n: step_seconds(n) for n in sorted(options)}


def choose(times: dict[int, float]) -> int:
    """The count with the shortest step, where a larger count must beat the best smaller one by
    `MARGIN`."""
    best = min(times)
    for n in sorted(times):
        if times[n] < times[best] * (1 - MARGIN):
            best = n
    return best


class ThreadChoices:
    """Measured choices, one JSON object in `path`: {key: threads}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(model: Path, width: int, cpus: int) -> str:
        stat = model.stat()
        return (
            f"{model.resolve()}:{stat.st_size:x}:{int(stat.st_mtime):x}:width={width}:cpus={cpus}"
        )

    def get(self, key: str) -> int | None:
        try:
            value = json.loads(self.path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) and value >= 1 else None

    def put(self, key: str, threads: int) -> None:
        """Written under a temporary name and renamed: concurrent points never read half."""
        try:
            choices = json.loads(self.path.read_text())
            if not isinstance(choices, dict):
                choices = {}
        except (OSError, ValueError):
            choices = {}
        choices[key] = threads
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(choices, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError as exc:  # a read-only cache only costs a measurement at the next start
            log.warning("could not remember the engine's thread count in %s: %s", self.path, exc)


def pick_threads(
    timer: StepTimer, cpus: int, key: str, choices: ThreadChoices | None
) -> tuple[int, dict[int, float]]:
    """The remembered count for `key`, else the fastest measured with `timer` (remembered
    from then on); and the step times measured (empty when remembered)."""
    known = choices.get(key) if choices else None
    if known is not None:
        return known, {}
    measured = measure(timer.seconds, candidates(cpus))
    chosen = choose(measured)
    if choices:
        choices.put(key, chosen)
    log.info("engine threads: %d of %d CPUs (step seconds: %s)", chosen, cpus, measured)
    return chosen, measured
