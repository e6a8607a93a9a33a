"""Continuous batching over llama.cpp: concurrent sequences give the same text as one at a time."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from llama_cpp import Llama
from llama_cpp import llama_cpp as capi

from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.engines.batching import BatchedLlamaGenerator
from grifo.point.engines.llama import (
    LLAMA_CPP_LOGGER,
    GpuOffloadUnavailableError,
    model_params,
)
from grifo.point.engines.sampling import Candidates, chain
from grifo.point.engines.slots import beside, choose_slot
from tests.support.tiny_gguf import TINY_WORDS, write_tiny_gguf

pytestmark = pytest.mark.engine


class Sink:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.cancelled = False
        self.generation: Generation | None = None
        self.text: list[str] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._cancel_after = cancel_after

    def started(self, generation: Generation) -> None:
        self.generation = generation

    def piece(self, text: str) -> None:
        self.text.append(text)
        if self._cancel_after is not None and len(self.text) >= self._cancel_after:
            self.cancelled = True

    def finished(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> str:
        assert self.done.wait(30), "generation did not finish"
        return "".join(self.text)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", seed=3)


@pytest.fixture(scope="module")
def engine(model: Path) -> Iterator[BatchedLlamaGenerator]:
    gen = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=4, batch_tokens=64)
    yield gen
    gen.close()


def prompts(n: int) -> list[str]:
    return [" ".join(TINY_WORDS[i % 7 : i % 7 + 3 + i % 5]) for i in range(n)]


def direct(model: Path, prompt: str, max_tokens: int) -> str:
    llm = Llama(model_path=str(model), n_ctx=256, n_threads=1, verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, top_k=1)
    finally:
        llm.close()
    return str(out["choices"][0]["text"])  # type: ignore[index]


def run_all(engine: BatchedLlamaGenerator, texts: list[str], params: SamplingParams) -> list[Sink]:
    sinks = [Sink() for _ in texts]
    for text, sink in zip(texts, sinks, strict=True):
        engine.submit("completion", text, params, sink)
    for sink in sinks:
        sink.wait()
    return sinks


def test_concurrent_sequences_match_one_at_a_time(
    engine: BatchedLlamaGenerator, model: Path
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0)
    texts = prompts(10)  # more than the 4 slots: some wait for a free one
    alone = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=1, batch_tokens=64)
    try:
        expected = [s.wait() for s in run_all(alone, texts, params)]
    finally:
        alone.close()
    sinks = run_all(engine, texts, params)
    assert [s.wait() for s in sinks] == expected
    for sink in sinks:
        assert sink.error is None
        assert sink.generation is not None
        assert sink.generation.completion_tokens == 12
        assert sink.generation.finish_reason == "length"
    assert engine.active == 0
    # And the engine agrees with llama-cpp-python's own generation (greedy) on most prompts;
    # a rare late divergence is float noise on near-tied logits of this random model.
    agree = sum(a == direct(model, t, 12) for a, t in zip(expected, texts, strict=True))
    assert agree >= 8


def test_long_prompt_is_prefilled_in_chunks_beside_running_streams(
    engine: BatchedLlamaGenerator, model: Path
) -> None:
    long_prompt = " ".join(TINY_WORDS * 6)  # longer than one 64-token batch
    params = SamplingParams(max_tokens=8, temperature=0)
    short, long = Sink(), Sink()
    engine.submit("completion", "hello world", params, short)
    engine.submit("completion", long_prompt, params, long)
    assert long.wait() == direct(model, long_prompt, 8)
    assert short.wait() == direct(model, "hello world", 8)
    assert long.generation is not None
    assert long.generation.prompt_tokens > 64


def test_cancel_frees_the_slot(engine: BatchedLlamaGenerator) -> None:
    sink = Sink(cancel_after=3)
    engine.submit("completion", "the quick", SamplingParams(max_tokens=200, temperature=0), sink)
    sink.wait()
    assert sink.generation is not None
    assert sink.generation.finish_reason == "cancelled"
    assert sink.generation.completion_tokens < 200
    assert engine.active == 0


def test_stop_string_and_context_limit(engine: BatchedLlamaGenerator, model: Path) -> None:
    full = direct(model, "hello", 16)
    stop = full[5:8]
    sink = Sink()
    engine.submit(
        "completion", "hello", SamplingParams(max_tokens=16, temperature=0, stop=(stop,)), sink
    )
    assert sink.wait() == full[: full.index(stop)]
    assert sink.generation is not None
    assert sink.generation.finish_reason == "stop"
    too_long = Sink()
    engine.submit("completion", " ".join(TINY_WORDS * 20), SamplingParams(max_tokens=4), too_long)
    too_long.wait()
    assert too_long.generation is None
    assert getattr(too_long.error, "code", None) == "context_length_exceeded"


def test_chat_uses_the_model_template(engine: BatchedLlamaGenerator) -> None:
    sink = Sink()
    messages = [{"role": "user", "content": "hello world"}]
    engine.submit("chat", messages, SamplingParams(max_tokens=5, temperature=0.7, seed=1), sink)
    text = sink.wait()
    assert sink.error is None
    assert sink.generation is not None
    assert sink.generation.prompt_tokens > 3
    assert text


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_requantized_model_is_cached_and_serves(model: Path, tmp_path: Path, quant: str) -> None:
    from grifo.point.engines.llama import requantized

    first = requantized(model, quant, tmp_path)
    mtime = first.stat().st_mtime_ns
    assert requantized(model, quant, tmp_path) == first
    assert first.stat().st_mtime_ns == mtime, "the conversion should run once"
    assert first.stat().st_size < model.stat().st_size
    engine = BatchedLlamaGenerator(first, "tiny-q", context_length=128, slots=2)
    try:
        sink = Sink()
        engine.submit(
            "completion", "hello world", SamplingParams(max_tokens=6, temperature=0), sink
        )
        assert sink.wait()
        assert sink.generation is not None
        assert sink.generation.completion_tokens == 6
    finally:
        engine.close()
    assert not list(tmp_path.glob("*.partial"))


class _FakeLlamaApi:
    """Stands in for llama.cpp's C API where only its build report matters."""

    def __init__(self, system_info: bytes, gpu: bool = False) -> None:
        self._info = system_info
        self._gpu = gpu

    def llama_print_system_info(self) -> bytes:
        return self._info

    def llama_supports_gpu_offload(self) -> bool:
        return self._gpu

    def llama_model_default_params(self) -> object:
        from llama_cpp import llama_cpp as capi

        return capi.llama_model_default_params()


@pytest.mark.parametrize(
    ("info", "repacked"),
    [(b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |", False), (b"CPU : AVX2 = 1 |", True)],
)
def test_a_build_with_amx_kernels_loads_weights_unrepacked(info: bytes, repacked: bool) -> None:
    from grifo.point.engines.llama import model_params

    assert model_params(_FakeLlamaApi(info)).use_extra_bufts is repacked


@pytest.mark.parametrize(("layers", "n_gpu_layers"), [(0, 0), (5, 5), ("all", -1)])
def test_gpu_layers_reach_llama_cpp_on_a_build_with_a_gpu_backend(
    layers: int | Literal["all"], n_gpu_layers: int
) -> None:
    params = model_params(_FakeLlamaApi(b"CUDA : ARCHS = 900 |", gpu=True), layers)
    assert params.n_gpu_layers == n_gpu_layers


@pytest.mark.parametrize(("level", "quiet"), [(logging.NOTSET, True), (logging.DEBUG, False)])
def test_llama_cpp_details_stay_off_stderr_unless_asked_for(
    model: Path, level: int, quiet: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger(LLAMA_CPP_LOGGER)
    before = logger.level
    logger.setLevel(level)  # NOTSET: as in a point, where nothing else sets it
    try:
        capsys.readouterr()
        BatchedLlamaGenerator(model, "tiny", context_length=256, slots=2).close()
        printed = capsys.readouterr().err
    finally:
        logger.setLevel(before)
    assert ("llama_context" not in printed) is quiet


GPU_BUILD = bool(capi.llama_supports_gpu_offload())


@pytest.mark.skipif(GPU_BUILD, reason="this llama-cpp-python has a GPU backend")
def test_gpu_layers_on_a_build_without_a_gpu_backend_refuse_to_start(model: Path) -> None:
    with pytest.raises(GpuOffloadUnavailableError, match="CMAKE_ARGS=-DGGML_CUDA=on"):
        BatchedLlamaGenerator(model, "tiny", context_length=256, gpu_layers="all")
    cpu = BatchedLlamaGenerator(model, "tiny", context_length=256, gpu_layers=0)
    assert cpu.gpu_layers == 0
    cpu.close()


@pytest.mark.skipif(not GPU_BUILD, reason="needs llama-cpp-python built with a GPU backend")
def test_a_gpu_engine_batches_and_answers_as_the_cpu_one(model: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0)
    texts = prompts(10)
    cpu = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=1, batch_tokens=64)
    try:
        expected = [s.wait() for s in run_all(cpu, texts, params)]
    finally:
        cpu.close()
    gpu = BatchedLlamaGenerator(
        model, "tiny", context_length=256, slots=4, batch_tokens=64, gpu_layers="all"
    )
    try:
        assert gpu.gpu_layers == capi.llama_model_n_layer(gpu._model.model) > 0
        sinks = run_all(gpu, texts, params)
    finally:
        gpu.close()
    assert all(s.generation and s.generation.completion_tokens == 12 for s in sinks)
    # Float noise on near-tied logits of this random model may move a late token (see above).
    assert sum(s.wait() == e for s, e in zip(sinks, expected, strict=True)) >= 8


def test_a_shared_prefix_is_reused_and_answers_do_not_change(model: Path) -> None:
    """Turns of one conversation: each prompt extends the last. With the prefix cache the
    engine computes only the new tokens, and greedy answers equal those computed afresh."""
    base = " ".join(TINY_WORDS * 2)  # one token a word, after the BOS token
    turns = [base, base + " the quick brown fox", base + " the quick brown fox jumps over"]
    turns.append(" ".join(TINY_WORDS[5:20]))  # unrelated: nothing to reuse
    turns.append(turns[2] + " the lazy dog")  # the conversation goes on
    params = SamplingParams(max_tokens=6, temperature=0)
    answers: dict[bool, list[str]] = {}
    reused: dict[bool, list[int]] = {}
    for cache in (False, True):
        gen = BatchedLlamaGenerator(
            model, "tiny", context_length=256, slots=2, batch_tokens=64, prefix_cache=cache
        )
        try:
            sinks = [run_all(gen, [t], params)[0] for t in turns]
        finally:
            gen.close()
        answers[cache] = [s.wait() for s in sinks]
        reused[cache] = [s.generation.cached_tokens for s in sinks if s.generation is not None]
    assert answers[True] == answers[False]
    assert reused[False] == [0, 0, 0, 0, 0]
    first = reused[True]
    assert first[0] == 0
    assert first[1] >= 2 * len(TINY_WORDS)  # the whole shared base
    assert first[2] > first[1]  # the second turn's prompt is cached too
    assert first[3] == 0  # it takes the other slot, keeping the conversation's
    assert first[4] > first[2]


class _RecordingApi:
    """llama.cpp's C API, recording the sequence ids of every batch the engine decodes."""

    def __init__(self, capi: Any) -> None:
        self._capi = capi
        self.batches: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._capi, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        self.batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return int(self._capi.llama_decode(ctx, batch))


def test_batches_go_in_slot_order_and_running_slots_stay_consecutive(model: Path) -> None:
    """llama.cpp computes sequences of one batch together only in runs of consecutive ids in
    increasing order (any other batch costs a pass over the weights per run)."""
    engine = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=4, batch_tokens=64)
    recorder = _RecordingApi(engine._capi)
    engine._capi = recorder
    try:
        params = SamplingParams(max_tokens=12, temperature=0)
        run_all(engine, ["hello world"], params)  # slot 0 is now the most recently used
        recorder.batches.clear()
        sinks = run_all(engine, prompts(4), params)
    finally:
        engine.close()
    assert all(s.error is None for s in sinks)
    assert recorder.batches
    for ids in recorder.batches:
        assert ids == sorted(ids), f"a batch out of slot order: {ids}"
    assert [0, 1, 2, 3] in recorder.batches  # all four decoding in one run


@pytest.mark.parametrize(
    ("free", "shared", "last_used", "running", "expected"),
    [
        # a gap between running slots is filled first, even by a more recently used slot
        ([1, 3], [0, 0], [5, 1], {0, 2}, (1, 0)),
        # beside a running slot rather than apart from all (slot 3 is older)
        ([1, 3], [0, 0], [5, 1], {0}, (1, 0)),
        # nothing running: the least recently used slot
        ([0, 1, 2], [0, 0, 0], [3, 1, 2], set(), (1, 0)),
        # a reusable prefix wins over keeping the run together
        ([1, 3], [0, 40], [1, 1], {0, 2}, (3, 40)),
        # too short to be worth reusing: treated as nothing shared
        ([1, 3], [0, 5], [1, 1], {0, 2}, (1, 0)),
    ],
)
def test_choose_slot(
    free: list[int],
    shared: list[int],
    last_used: list[int],
    running: set[int],
    expected: tuple[int, int],
) -> None:
    assert choose_slot(free, shared, last_used, running) == expected


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=1, temperature=0.9, seed=11),
        SamplingParams(max_tokens=1, temperature=1.3, seed=5, frequency_penalty=0.5),
        SamplingParams(max_tokens=1, temperature=0, json_schema='{"type": "object"}'),
    ],
    ids=["greedy", "seeded", "penalties", "grammar"],
)
def test_candidates_pick_what_llama_sampler_sample_picks(
    engine: BatchedLlamaGenerator, model: Path, params: SamplingParams
) -> None:
    """The engine's reused candidates array picks, step after step, the tokens that
    llama.cpp's own `llama_sampler_sample` picks with an identical chain."""
    from llama_cpp import _internals as internals
    from llama_cpp import llama_cpp as capi

    llm: Any = internals.LlamaModel(path_model=str(model), params=model_params(capi), verbose=False)
    ctx_params = capi.llama_context_default_params()
    ctx_params.n_ctx = 256
    ctx: Any = internals.LlamaContext(model=llm, params=ctx_params, verbose=False)
    batch: Any = internals.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1, verbose=False)
    prompt = llm.tokenize(b"the quick brown fox", True, False)
    batch.set_batch(prompt, 0, False)  # logits of the last token only
    ctx.decode(batch)
    last = len(prompt) - 1
    ours = chain(internals, llm, params)
    theirs = chain(internals, llm, params)
    if theirs is None:  # the engine runs no chain for plain greedy: compare with llama.cpp's
        theirs = internals.LlamaSampler()
        theirs.add_greedy()
    candidates = Candidates(capi, capi.llama_vocab_n_tokens(llm.vocab))
    try:
        picked = []
        for _ in range(24):  # the same logits each time: the chains' state must move alike
            expected = capi.llama_sampler_sample(theirs.sampler, ctx.ctx, last)
            assert candidates.sample(ours, ctx.ctx, last) == expected
            picked.append(expected)
        if params.temperature > 0:
            assert len(set(picked)) > 1  # a real draw, not one fixed token
    finally:
        for sampler in (theirs, ours):
            if sampler is not None:
                sampler.close()
        ctx.close()
        llm.close()


@pytest.mark.parametrize(
    ("slot", "free", "last_used", "running", "expected"),
    [
        (0, [0, 2], [1, 5], {3}, 2),  # apart from the running slot: next to it instead
        (0, [0, 1, 4], [1, 5, 2], {2, 3}, 4),  # beside either end: the less recently used
        (0, [0, 2, 4], [1, 5, 9], {3, 5}, 4),  # between two running slots first
        (2, [0, 2], [1, 5], {3}, None),  # already beside a running slot
        (0, [0, 1], [1, 5], set(), None),  # nothing running: nothing to stay next to
        (0, [0, 5], [1, 5], {2, 3}, None),  # no free slot beside the running ones
    ],
)
def test_beside(
    slot: int, free: list[int], last_used: list[int], running: set[int], expected: int | None
) -> None:
    assert beside(slot, free, last_used, running) == expected


def test_a_reused_prefix_apart_from_running_slots_is_copied_beside_them(model: Path) -> None:
    """A conversation's next turn finds its prefix in a slot apart from the one running: the
    prefix is copied next to it, the two decode in one run of consecutive sequence ids, the
    prefix is still reused, and the answer is the one computed without any cache."""
    base = " ".join(TINY_WORDS * 2)
    follow_up = base + " the quick brown fox"
    params = SamplingParams(max_tokens=6, temperature=0)
    fresh = BatchedLlamaGenerator(
        model, "tiny", context_length=256, slots=4, batch_tokens=64, prefix_cache=False
    )
    try:
        expected = run_all(fresh, [follow_up], params)[0].wait()
    finally:
        fresh.close()
    engine = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=4, batch_tokens=64)
    recorder = _RecordingApi(engine._capi)
    engine._capi = recorder
    try:
        assert engine._copy_worth_it
        run_all(engine, [base], params)  # slot 0 holds the conversation
        for text in prompts(2):  # slots 1 and 2 are used after it
            run_all(engine, [text], params)
        recorder.batches.clear()
        long, turn = Sink(), Sink()
        engine.submit("completion", "hello", SamplingParams(max_tokens=200, temperature=0), long)
        engine.submit("completion", follow_up, params, turn)  # while slot 3 runs
        answer = turn.wait()
        long.wait()
    finally:
        engine.close()
    assert answer == expected
    assert turn.generation is not None
    assert turn.generation.cached_tokens >= 2 * len(TINY_WORDS)
    assert engine.prefix_copies == 1
    pairs = [ids for ids in recorder.batches if len(ids) == 2 and len(set(ids)) == 2]
    assert pairs, "the two requests never decoded together"
    assert all(ids == [2, 3] for ids in pairs), pairs


def test_a_gap_left_by_an_early_finish_is_closed(model: Path) -> None:
    """Four sequences in slots 0 to 3; the one in slot 1 finishes early. With nothing waiting
    to take slot 1, the sequence in slot 3 moves there (its cache copied whole), the three go on
    decoding as one run in slot order, and every answer is the one computed alone."""
    texts = prompts(4)
    limits = [40, 3, 40, 40]
    alone = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=1, batch_tokens=64)
    try:
        expected = [
            run_all(alone, [t], SamplingParams(max_tokens=n, temperature=0))[0].wait()
            for t, n in zip(texts, limits, strict=True)
        ]
    finally:
        alone.close()
    engine = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=4, batch_tokens=64)
    recorder = _RecordingApi(engine._capi)
    engine._capi = recorder
    sinks = [Sink() for _ in texts]
    try:
        for text, limit, sink in zip(texts, limits, sinks, strict=True):
            engine.submit("completion", text, SamplingParams(max_tokens=limit, temperature=0), sink)
        answers = [sink.wait() for sink in sinks]
    finally:
        engine.close()
    assert answers == expected
    assert engine.gap_moves == 1
    assert engine.prefix_copies == 0
    triples = [ids for ids in recorder.batches if len(ids) == 3 and len(set(ids)) == 3]
    assert triples, "the three long sequences never decoded without the short one"
    assert all(ids == [0, 1, 2] for ids in triples), triples


def test_answers_stay_exact_while_slots_move(model: Path) -> None:
    """A stream of requests, three at a time, with shared prefixes and uneven lengths, so that
    prefixes are reused, often copied beside running slots, and gaps are closed while others
    decode (how often depends on timing; the tests above pin each case down): every answer is
    still the one computed alone, with no cache."""
    rng = random.Random(7)
    bases = [" ".join(TINY_WORDS[i : i + 20] * 2) for i in range(3)]
    jobs = [
        (rng.choice(bases) + " " + " ".join(rng.sample(TINY_WORDS, 3)), rng.randint(1, 30))
        for _ in range(24)
    ]
    alone = BatchedLlamaGenerator(
        model, "tiny", context_length=256, slots=1, batch_tokens=64, prefix_cache=False
    )
    try:
        expected = [
            run_all(alone, [text], SamplingParams(max_tokens=n, temperature=0))[0].wait()
            for text, n in jobs
        ]
    finally:
        alone.close()
    engine = BatchedLlamaGenerator(model, "tiny", context_length=256, slots=4, batch_tokens=64)
    sinks = [Sink() for _ in jobs]
    try:
        for i, ((text, n), sink) in enumerate(zip(jobs, sinks, strict=True)):
            while sum(not s.done.is_set() for s in sinks[:i]) >= 3:  # 3 in flight
                next(s for s in sinks[:i] if not s.done.is_set()).done.wait(0.01)
            engine.submit("completion", text, SamplingParams(max_tokens=n, temperature=0), sink)
        answers = [sink.wait() for sink in sinks]
    finally:
        engine.close()
    assert all(sink.error is None for sink in sinks)
    assert answers == expected
    assert engine.reused_tokens > 0
    assert engine.active == 0
