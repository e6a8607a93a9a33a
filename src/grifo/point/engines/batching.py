"""llama.cpp with continuous batching: every active sequence advances in one `llama_decode`.

One engine thread owns the model, the context (one KV-cache stream per slot) and a batch. Each
step puts the next token of every decoding sequence into the batch first, then fills the rest
with prompt chunks of newly admitted sequences, so a long prompt never stalls running streams.
New requests join between steps; finished or cancelled ones leave and free their slot.

A slot keeps what its last sequence left in the KV cache. A new request takes the free slot
whose cached tokens share the longest prefix with its prompt and prefills only the rest: the
turns of a conversation, an agent's steps and requests with the same long system prompt reuse
their prefix instead of computing it again (`prefix_cache=False` turns this off).

Slot numbers are llama.cpp sequence ids, and each has its own cache stream. llama.cpp computes
a batch of such sequences together only for runs of consecutive ids in increasing order; any
other order, or a gap, splits the step into one pass over the weights per run (with 8 streams
in reverse order a step cost as much as 8 one-token steps). So the batch is always in slot
order, a request takes a slot next to running ones (`slots.py`), a reused prefix cached apart
from them is copied beside them, and a gap left by a sequence that finished early is closed by
moving the last one into it.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from grifo.cpus import available_cpus
from grifo.errors import InvalidRequestError
from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.engines.chat_template import ChatTemplate
from grifo.point.engines.llama import ContextLengthError, StopHold, model_params
from grifo.point.engines.sampling import Candidates, chain
from grifo.point.engines.slots import beside, choose_slot, shared_prefix
from grifo.point.engines.threads import StepTimer, ThreadChoices, pick_threads

Kind = Literal["chat", "completion"]


class GenerationSink(Protocol):
    """Receives one generation's progress; every method is called from the engine thread."""

    cancelled: bool

    def started(self, generation: Generation) -> None: ...

    def piece(self, text: str) -> None: ...

    def finished(self, error: BaseException | None) -> None: ...


@dataclass(slots=True)
class _Request:
    kind: Kind
    payload: str | Sequence[dict[str, str]]
    params: SamplingParams
    sink: GenerationSink


@dataclass(slots=True)
class _Sequence:
    slot: int
    request: _Request
    generation: Generation
    prompt: list[int]
    limit: int
    sampler: Any  # a llama.cpp sampler chain; None: greedy, the most likely token
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    hold: StopHold = field(default_factory=lambda: StopHold(()))
    prefilled: int = 0
    next_token: int = -1
    batch_index: int = -1
    generated: list[int] = field(default_factory=list)
    decoded: int = 0  # generated tokens fed back into the KV cache

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


class BatchedLlamaGenerator:
    """A text generator serving up to `slots` sequences at once."""

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        *,
        context_length: int = 2048,
        threads: int | Literal["auto"] = 1,
        slots: int = 4,
        batch_tokens: int = 512,
        prefix_cache: bool = True,
        thread_choices: Path | None = None,
        gpu_layers: int | Literal["all"] = 0,
    ) -> None:
        """`threads="auto"`: the count that decodes a full batch fastest here (`threads.py`),
        measured at start unless `thread_choices` (a JSON file) remembers it for this model,
        batch width and CPU count. `gpu_layers`: layers offloaded to the GPU (`all`: every one;
        `GpuOffloadUnavailableError` when this llama.cpp build has no GPU backend)."""
        from llama_cpp import _internals as internals
        from llama_cpp import llama_cpp as capi

        # llama-cpp-python's low-level wrappers are untyped.
        self._capi: Any = capi
        self._internals: Any = internals
        self.model_id = model_id
        self.context_length = context_length
        self.slots = slots
        self._batch_tokens = batch_tokens
        self._model: Any = self._internals.LlamaModel(
            path_model=str(model_path), params=model_params(capi, gpu_layers), verbose=False
        )
        layers = capi.llama_model_n_layer(self._model.model)
        self.gpu_layers = layers if gpu_layers == "all" else min(gpu_layers, layers)
        params = capi.llama_context_default_params()
        params.n_ctx = context_length * slots
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = slots
        cpus = available_cpus()
        params.n_threads = params.n_threads_batch = cpus if threads == "auto" else threads
        params.kv_unified = False  # one cache stream per slot: sequences do not share prefixes
        self._ctx = internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(
            n_tokens=batch_tokens, embd=0, n_seq_max=1, verbose=False
        )
        self.measured: dict[int, float] = {}  # threads: seconds of a full batch step
        if threads == "auto":
            bos = self._model.token_bos()
            timer = StepTimer(capi, self._ctx, self._batch.batch, slots, bos)
            key = ThreadChoices.key(model_path, slots, cpus)
            choices = ThreadChoices(thread_choices) if thread_choices else None
            threads, self.measured = pick_threads(timer, cpus, key, choices)
            capi.llama_set_n_threads(self._ctx.ctx, threads, threads)
        self.threads = threads
        self._candidates = Candidates(capi, capi.llama_vocab_n_tokens(self._model.vocab))
        self._template = ChatTemplate(self._model, model_id)
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._free = list(range(slots))
        self._prefix_cache = prefix_cache
        self._cached: list[list[int]] = [[] for _ in range(slots)]  # tokens in each slot's KV
        self._last_used = [0] * slots
        self._uses = 0
        self.reused_tokens = 0  # prompt tokens taken from the cache instead of computed
        self.prefix_copies = 0  # reused prefixes copied beside the running slots
        self.gap_moves = 0  # running sequences moved into a gap left by an early finish
        model = self._model.model
        layers, heads = capi.llama_model_n_layer(model), capi.llama_model_n_head(model)
        kv_width = capi.llama_model_n_embd(model) // heads * capi.llama_model_n_head_kv(model)
        stream_bytes = 2 * layers * kv_width * 2 * context_length  # K and V, f16
        self._copy_worth_it = stream_bytes < capi.llama_model_size(model)
        self._active: list[_Sequence] = []
        self._thread = threading.Thread(target=self._run, name="grifo-batch", daemon=True)
        self._thread.start()

    # -- called from any thread ----------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet started (read from any thread)."""
        return self._inbox.qsize()

    def submit(
        self,
        kind: Kind,
        payload: str | Sequence[dict[str, str]],
        params: SamplingParams,
        sink: GenerationSink,
    ) -> None:
        self._inbox.put(_Request(kind, payload, params, sink))

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(10)
        for part in (self._batch, self._ctx, self._model):
            part.close()

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._admit(block=not self._active):
                break
            if self._active:
                if self._copy_worth_it and self._inbox.empty():
                    self._close_gaps()  # nothing waiting would fill them
                self._step()
        for seq in list(self._active):
            self._finish(seq, "cancelled")

    def _close_gaps(self) -> None:
        """Moves the sequence in the highest running slot into a free slot below it while the
        running slots are not one run of consecutive ids (a sequence that finished early left a
        gap): the cache stream is copied whole and the old slot emptied. Copying a stream costs
        less than the extra pass over the weights that every step of a split batch pays."""
        while True:
            slots = [seq.slot for seq in self._active]
            gaps = [slot for slot in self._free if slots[0] < slot < slots[-1]]
            if not gaps:
                return
            seq, target = self._active[-1], min(gaps)
            self._capi.llama_memory_seq_cp(self._ctx.memory, seq.slot, target, -1, -1)
            self._capi.llama_memory_seq_rm(self._ctx.memory, seq.slot, -1, -1)
            self._cached[seq.slot] = self._cached[target] = []
            self._free.remove(target)
            self._free.append(seq.slot)
            seq.slot = target
            self._active.sort(key=lambda s: s.slot)
            self.gap_moves += 1

    def _admit(self, block: bool) -> bool:
        """Start waiting requests while slots are free; False once the engine is closing."""
        while self._free:
            try:
                request = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            block = False
            if request.sink.cancelled:
                request.sink.finished(InterruptedError("cancelled before it started"))
                continue
            try:
                self._start(request)
            except InvalidRequestError as exc:
                request.sink.finished(exc)
        return True

    def _start(self, request: _Request) -> None:
        if request.kind == "chat":
            assert not isinstance(request.payload, str)
            text = self._template.render(request.payload)
        else:
            assert isinstance(request.payload, str)
            text = request.payload
        prompt = self._model.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        room = self.context_length - len(prompt)
        if room < 1 or not prompt:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; {self.model_id} has a context of "
                f"{self.context_length} tokens",
                param="messages" if request.kind == "chat" else "prompt",
            )
        params = request.params
        sampler = chain(self._internals, self._model, params)  # may refuse it: before a slot
        slot, keep = self._take_slot(prompt)
        generation = Generation(prompt_tokens=len(prompt), pieces=iter(()), cached_tokens=keep)
        seq = _Sequence(
            slot=slot,
            request=request,
            generation=generation,
            prompt=prompt,
            limit=min(params.max_tokens, room),
            sampler=sampler,
            hold=StopHold(params.stop),
            prefilled=keep,
        )
        bisect.insort(self._active, seq, key=lambda s: s.slot)  # the batch goes in slot order
        request.sink.started(generation)

    def _take_slot(self, prompt: list[int]) -> tuple[int, int]:
        """A free slot for `prompt` (`choose_slot`), with its cache cut to the prefix it
        shares; and how many tokens it keeps (never the whole prompt: the last token is
        computed again for its logits).

        A reused prefix sitting apart from the running slots is copied to a free slot beside
        them (`beside`) when a cache stream is smaller than the weights: the copy costs less
        than one extra pass over the weights, which every step of a split batch pays. The
        source slot keeps its cache for later requests."""
        running, free = self._running(), self._free
        used = [self._last_used[slot] for slot in free]
        shared = [
            shared_prefix(self._cached[slot], prompt) if self._prefix_cache else 0 for slot in free
        ]
        best, common = choose_slot(free, shared, used, running)
        keep = min(common, len(prompt) - 1)
        target = beside(best, free, used, running) if keep and self._copy_worth_it else None
        if target is not None:
            # Between cache streams llama.cpp copies only whole sequences: a partial range
            # fails an assertion that aborts the process.
            self._capi.llama_memory_seq_cp(self._ctx.memory, best, target, -1, -1)
            self.prefix_copies += 1
            best = target
        self._capi.llama_memory_seq_rm(self._ctx.memory, best, keep, -1)
        self._cached[best] = []
        self._free.remove(best)
        self.reused_tokens += keep
        return best, keep

    def _running(self) -> set[int]:
        return {seq.slot for seq in self._active}

    def _step(self) -> None:
        self._fill_batch()
        if self._capi.llama_decode(self._ctx.ctx, self._batch.batch) != 0:
            for seq in list(self._active):
                self._finish(seq, "error", RuntimeError("llama_decode failed"))
            return
        for seq in list(self._active):
            if seq.batch_index >= 0:
                self._advance(seq)

    def _fill_batch(self) -> None:
        """Every decoding sequence's next token, and as much of waiting prompts as the batch
        has room for after those, in slot order."""
        batch = self._batch.batch
        room = self._batch_tokens - sum(1 for seq in self._active if seq.decoding)
        n = 0
        for seq in self._active:
            seq.batch_index = -1
            if seq.decoding:
                pos = len(seq.prompt) + seq.generation.completion_tokens - 1
                self._put(batch, n, seq.next_token, pos, seq.slot, True)
                seq.batch_index = n
                seq.decoded += 1  # if this decode fails, every sequence ends with its cache
                n += 1
            elif room > 0:
                end = min(len(seq.prompt), seq.prefilled + room)
                for pos in range(seq.prefilled, end):
                    self._put(batch, n, seq.prompt[pos], pos, seq.slot, pos == len(seq.prompt) - 1)
                    n += 1
                room -= end - seq.prefilled
                seq.prefilled = end
                if end == len(seq.prompt):
                    seq.batch_index = n - 1
        batch.n_tokens = n

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _advance(self, seq: _Sequence) -> None:
        if seq.request.sink.cancelled:
            self._finish(seq, "cancelled")
            return
        token = self._candidates.sample(seq.sampler, self._ctx.ctx, seq.batch_index)
        if self._capi.llama_vocab_is_eog(self._model.vocab, token):
            self._finish(seq, "stop")
            return
        seq.generation.completion_tokens += 1
        seq.generated.append(token)
        text, stopped = seq.hold.push(seq.decoder.decode(self._model.detokenize([token])))
        if text:
            seq.request.sink.piece(text)
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generation.completion_tokens >= seq.limit:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(
        self, seq: _Sequence, reason: str, error: BaseException | None = None, flush: bool = True
    ) -> None:
        if flush and error is None and reason != "cancelled":
            tail = seq.hold.flush(seq.decoder.decode(b"", final=True))
            if tail:
                seq.request.sink.piece(tail)
        seq.generation.finish_reason = reason
        if error is None and self._prefix_cache:  # the slot's KV holds exactly these tokens
            self._cached[seq.slot] = seq.prompt[: seq.prefilled] + seq.generated[: seq.decoded]
        else:
            self._capi.llama_memory_seq_rm(self._ctx.memory, seq.slot, -1, -1)
            self._cached[seq.slot] = []
        self._uses += 1
        self._last_used[seq.slot] = self._uses
        if seq.sampler is not None:
            with contextlib.suppress(Exception):
                seq.sampler.close()
        self._active.remove(seq)
        self._free.append(seq.slot)
        seq.request.sink.finished(error)
