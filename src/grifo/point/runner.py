"""Runs blocking engines off the event loop and keeps the point's load signals.

One thread owns the generator (llama.cpp contexts are not thread-safe), one the embedder. Jobs
wait their turn in a FIFO; text pieces cross back to the loop with `call_soon_threadsafe`. A job
whose client went away is cancelled between tokens, or skipped if it never started.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from grifo.errors import GrifoError
from grifo.point.engines.base import Embedder, EmbeddingResult, Generation, Generator


@dataclass(frozen=True, slots=True)
class LoadSignal:
    """What the gateway reads to estimate queueing at this point."""

    in_flight: int
    queued: int
    completed: int
    tokens_per_s: float


class GenerationJob:
    """A generation requested by one HTTP request; consumed with `pieces()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.started: asyncio.Future[Generation] = loop.create_future()
        self.generation: Generation | None = None
        self.cancelled = False
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.generation is not None:
            self.generation.cancelled = True

    async def pieces(self) -> AsyncIterator[str]:
        while (piece := await self._queue.get()) is not None:
            yield piece
        if self.error is not None:
            raise self.error

    # -- worker-thread side ---------------------------------------------------------------------
    def _publish(self, piece: str | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)

    def _settle(self, generation: Generation | None, error: BaseException | None) -> None:
        def settle() -> None:
            if self.started.done():
                return
            if error is not None:
                self.started.set_exception(error)
            elif generation is not None:
                self.started.set_result(generation)

        self._loop.call_soon_threadsafe(settle)


class EngineRunner:
    """The engines of one point and the queue in front of them."""

    def __init__(self, generator: Generator | None, embedder: Embedder | None) -> None:
        self.generator = generator
        self.embedder = embedder
        self._gen_thread = ThreadPoolExecutor(1, thread_name_prefix="grifo-generate")
        self._emb_thread = ThreadPoolExecutor(1, thread_name_prefix="grifo-embed")
        self._gen_active = 0  # written only by the generator thread
        self._emb_active = 0  # written only by the event loop
        self._submitted = 0  # event loop
        self._taken = 0  # generator thread
        self._completed = 0
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)

    def load(self) -> LoadSignal:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._token_times if now - t <= 10.0]
        tokens = sum(n for _, n in recent)
        in_flight = self._gen_active + self._emb_active
        return LoadSignal(in_flight, self._submitted - self._taken, self._completed, tokens / 10.0)

    async def generate(self, start: Callable[[Generator], Generation]) -> GenerationJob:
        """Queue a generation; returns once it has started (prompt tokenized and accepted)."""
        if self.generator is None:
            raise GrifoError("this point has no text-generation engine")
        loop = asyncio.get_running_loop()
        job = GenerationJob(loop)
        self._submitted += 1
        loop.run_in_executor(self._gen_thread, self._run, job, start)
        try:
            await asyncio.shield(job.started)
        except asyncio.CancelledError:
            job.cancel()
            raise
        return job

    def _run(self, job: GenerationJob, start: Callable[[Generator], Generation]) -> None:
        self._taken += 1
        if job.cancelled or self.generator is None:
            job._settle(None, asyncio.CancelledError())
            return
        self._gen_active += 1
        produced = 0
        try:
            try:
                generation = start(self.generator)
            except BaseException as exc:
                job._settle(None, exc)
                return
            job.generation = generation
            generation.cancelled = job.cancelled
            job._settle(generation, None)
            try:
                for piece in generation.pieces:
                    job._publish(piece)
            except Exception as exc:  # an engine failure mid-generation ends the stream
                job.error = exc
            produced = generation.completion_tokens
        finally:
            self._gen_active -= 1
            self._completed += 1
            self._token_times.append((time.monotonic(), produced))
            job._publish(None)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        if self.embedder is None:
            raise GrifoError("this point has no embedding engine")
        embedder = self.embedder
        self._emb_active += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._emb_thread, embedder.embed, list(texts))
        finally:
            self._emb_active -= 1
            self._completed += 1

    def close(self) -> None:
        self._gen_thread.shutdown(wait=False, cancel_futures=True)
        self._emb_thread.shutdown(wait=False, cancel_futures=True)
