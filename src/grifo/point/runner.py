"""Runs blocking engines off the event loop and keeps the point's load signals.

Two kinds of generator: a sequential one (`Generator`: one generation at a time in one thread,
FIFO) and a batching one (`BatchGenerator`: owns its thread and interleaves many generations).
Either way a `GenerationJob` carries the text back to the loop with `call_soon_threadsafe`, and
a job whose client went away is cancelled between tokens, or skipped if it never started.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from grifo.errors import GrifoError
from grifo.point.engines.base import (
    Embedder,
    EmbeddingResult,
    Generation,
    Generator,
    SamplingParams,
)

Kind = Literal["chat", "completion"]
Payload = str | Sequence[dict[str, str]]


@runtime_checkable
class BatchGenerator(Protocol):
    """A generator that schedules its own work; see `engines.batching`."""

    model_id: str
    context_length: int

    @property
    def active(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    def submit(
        self, kind: Kind, payload: Payload, params: SamplingParams, sink: GenerationJob
    ) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadSignal:
    """What the gateway reads to estimate queueing at this point."""

    in_flight: int
    queued: int
    completed: int
    tokens_per_s: float


class GenerationJob:
    """One generation for one HTTP request. The engine side calls `started`, `piece` and
    `finished` from its thread; the request side awaits `started` and iterates `pieces()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: EngineRunner) -> None:
        self._loop = loop
        self._runner = runner
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.started_future: asyncio.Future[Generation] = loop.create_future()
        self.generation: Generation | None = None
        self.cancelled = False
        self.error: BaseException | None = None
        self.created = time.monotonic()  # for the point's own latency metrics and span
        self.first_piece: float | None = None
        self.model = ""
        self.span: Any = None  # the engine's trace span, when the point traces

    def cancel(self) -> None:
        self.cancelled = True
        if self.generation is not None:
            self.generation.cancelled = True

    async def pieces(self) -> AsyncIterator[str]:
        while (piece := await self._queue.get()) is not None:
            if self.first_piece is None:
                self.first_piece = time.monotonic()
            yield piece
        if self.error is not None:
            raise self.error

    # -- engine side (any thread) -----------------------------------------------------------------
    def started(self, generation: Generation) -> None:
        self.generation = generation
        generation.cancelled = self.cancelled
        self._loop.call_soon_threadsafe(self._settle, generation, None)

    def piece(self, text: str) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, text)

    def finished(self, error: BaseException | None) -> None:
        produced = self.generation.completion_tokens if self.generation is not None else 0
        self._runner._record(produced)
        if self.generation is None:
            self._loop.call_soon_threadsafe(self._settle, None, error or GrifoError("no start"))
            return
        self.error = error
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def _settle(self, generation: Generation | None, error: BaseException | None) -> None:
        if self.started_future.done():
            return
        if error is not None:
            self.started_future.set_exception(error)
        elif generation is not None:
            self.started_future.set_result(generation)


class EngineRunner:
    """The engines of one point and the queue in front of them."""

    def __init__(
        self, generator: Generator | BatchGenerator | None, embedder: Embedder | None
    ) -> None:
        self.generator = generator
        self.embedder = embedder
        self._gen_thread = ThreadPoolExecutor(1, thread_name_prefix="grifo-generate")
        self._emb_thread = ThreadPoolExecutor(1, thread_name_prefix="grifo-embed")
        self._gen_active = 0  # written only by the generator thread
        self._emb_active = 0  # written only by the event loop
        self._submitted = 0  # event loop
        self._taken = 0  # generator thread
        self._completed: deque[tuple[float, int]] = deque(maxlen=4096)

    def load(self) -> LoadSignal:
        now = time.monotonic()
        recent = [n for t, n in list(self._completed) if now - t <= 10.0]
        gen = self.generator
        if isinstance(gen, BatchGenerator):
            running, queued = gen.active, gen.waiting
        else:
            running, queued = self._gen_active, self._submitted - self._taken
        return LoadSignal(
            running + self._emb_active, queued, len(self._completed), sum(recent) / 10
        )

    def _record(self, tokens: int) -> None:
        self._completed.append((time.monotonic(), tokens))

    async def generate(self, kind: Kind, payload: Payload, params: SamplingParams) -> GenerationJob:
        """Queue a generation; returns once it has started (prompt tokenized and accepted)."""
        gen = self.generator
        if gen is None:
            raise GrifoError("this point has no text-generation engine")
        loop = asyncio.get_running_loop()
        job = GenerationJob(loop, self)
        if isinstance(gen, BatchGenerator):
            gen.submit(kind, payload, params, job)
        else:
            self._submitted += 1
            loop.run_in_executor(self._gen_thread, self._run, gen, job, kind, payload, params)
        try:
            await asyncio.shield(job.started_future)
        except asyncio.CancelledError:
            job.cancel()
            raise
        return job

    def _run(
        self,
        gen: Generator,
        job: GenerationJob,
        kind: Kind,
        payload: Payload,
        params: SamplingParams,
    ) -> None:
        self._taken += 1
        if job.cancelled:
            job.finished(InterruptedError("cancelled before it started"))
            return
        self._gen_active += 1
        try:
            try:
                if kind == "chat":
                    assert not isinstance(payload, str)
                    generation = gen.start_chat(payload, params)
                else:
                    assert isinstance(payload, str)
                    generation = gen.start_completion(payload, params)
            except Exception as exc:
                job.finished(exc)
                return
            job.started(generation)
            error: BaseException | None = None
            try:
                for piece in generation.pieces:
                    job.piece(piece)
            except Exception as exc:  # an engine failure mid-generation ends the stream
                error = exc
            job.finished(error)
        finally:
            self._gen_active -= 1

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
            self._record(0)

    def close(self) -> None:
        if isinstance(self.generator, BatchGenerator):
            self.generator.close()
        self._gen_thread.shutdown(wait=False, cancel_futures=True)
        self._emb_thread.shutdown(wait=False, cancel_futures=True)
