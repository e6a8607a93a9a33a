"""Embedded engine throughput: raw llama-cpp-python vs grifo's batching engine, same model/threads.

Single stream: tokens/s of one 128-token completion (prefill included), best of 3.
Concurrent: aggregate tokens/s with N simultaneous requests in the batching engine.
Uneven: the same, the requests asking for 1/N, 2/N, ... all of the tokens in shuffled order.
Turn: aggregate tokens/s of one request running and a conversation's next turn whose prefix is
cached in a slot apart from it (the engine copies the prefix beside the running slot).
Decode steps: llama.cpp alone (no grifo code), the median time of one `llama_decode` that
advances one sequence by a token, and of one that advances N sequences by a token each, in a
context set up as the engine's. N x the first over the second is the most that batching N
sequences can gain over one on this host and model (the kernels' ceiling for the ratio above).
Usage: python bench/engine.py [--threads 1] [--concurrency 8] [--tokens 128] [--quantization q4_0]
                              [--gpu-layers all]
(--quantization converts the packaged Q4_1 model once, as `engine.quantization` does; both the
raw and the grifo runs then use the converted file.)

The raw run happens in a process of its own: llama.cpp's OpenMP threads stay spinning for a
while after a call, one team per calling thread, so a raw run in this process would leave a
team competing with the engine's (its decode thread has a team of its own): with 2 threads on
2 cores that cost the engine two thirds of its speed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

from llama_cpp import Llama
from llama_cpp import _internals as internals
from llama_cpp import llama_cpp as capi

from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.engines.batching import BatchedLlamaGenerator
from grifo.point.engines.llama import model_params, requantized, resolve_model

GpuLayers = int | Literal["all"]
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a recipe for a simple tomato soup:",
    "A short guide to caring for houseplants:",
]


class Sink:
    def __init__(self) -> None:
        self.cancelled = False
        self.generation: Generation | None = None
        self.done = threading.Event()

    def started(self, generation: Generation) -> None:
        self.generation = generation

    def piece(self, text: str) -> None:
        pass

    def finished(self, error: BaseException | None) -> None:
        self.done.set()


def raw_single(path: str, threads: int, tokens: int, gpu_layers: GpuLayers) -> float:
    llm = Llama(
        model_path=path,
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=-1 if gpu_layers == "all" else gpu_layers,
        verbose=False,
    )
    best = 0.0
    for i in range(3):
        start = time.perf_counter()
        out = llm.create_completion(PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0)
        elapsed = time.perf_counter() - start
        best = max(best, out["usage"]["completion_tokens"] / elapsed)  # type: ignore[index]
    llm.close()
    return best


def decode_steps(
    path: str, threads: int, n: int, steps: int, gpu_layers: GpuLayers
) -> tuple[float, float]:
    """Median seconds of a `llama_decode` of 1 token (one sequence, `steps` tokens on from its
    prompt) and of n tokens (n sequences, one each, the same span), in a context like the
    engine's: n cache streams, the same threads. Greedy decoding's positions, no sampling."""
    params = model_params(capi, gpu_layers)
    model: Any = internals.LlamaModel(path_model=path, params=params, verbose=False)
    params = capi.llama_context_default_params()
    params.n_ctx = 2048 * n
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = n
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False
    ctx: Any = internals.LlamaContext(model=model, params=params, verbose=False)
    batch: Any = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    prompts = []
    for seq in range(n):  # each sequence gets its own prompt in its own cache stream
        prompt = model.tokenize(PROMPTS[seq % len(PROMPTS)].encode(), True, False)
        batch.reset()
        batch.add_sequence(prompt, seq, False)
        ctx.decode(batch)
        prompts.append(len(prompt))
    token = model.token_bos()

    def phase(width: int) -> float:
        """Median time of `steps` decodes advancing sequences 0..width-1 from their prompts."""
        b, times = batch.batch, []
        for seq in range(width):  # forget earlier phases' tokens
            capi.llama_memory_seq_rm(ctx.memory, seq, prompts[seq], -1)
        for step in range(steps):
            for i in range(width):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, prompts[i] + step, 1, 1
                b.seq_id[i][0] = i
            b.n_tokens = width
            start = time.perf_counter()
            if capi.llama_decode(ctx.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    one, wide = phase(1), phase(n)
    ctx.close()
    model.close()
    return one, wide


def aggregate(engine: BatchedLlamaGenerator, texts: list[str], params: SamplingParams) -> float:
    """Tokens/s of all `texts` submitted at once, until the last one finishes."""
    sinks = [Sink() for _ in texts]
    start = time.perf_counter()
    for text, sink in zip(texts, sinks, strict=True):
        engine.submit("completion", text, params, sink)
    for sink in sinks:
        sink.done.wait()
    elapsed = time.perf_counter() - start
    return sum(s.generation.completion_tokens for s in sinks if s.generation) / elapsed


def grifo_run(engine: BatchedLlamaGenerator, n: int, tokens: int) -> float:
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return aggregate(engine, texts, SamplingParams(max_tokens=tokens, temperature=0))


def uneven_run(engine: BatchedLlamaGenerator, n: int, tokens: int) -> float:
    """Aggregate tokens/s of n requests asking for 1/n, 2/n, ... all of `tokens`, in a fixed
    shuffled order (short ones finish amid longer ones, leaving gaps among the running slots)."""
    shares = list(range(1, n + 1))
    random.Random(0).shuffle(shares)
    sinks = [Sink() for _ in range(n)]
    start = time.perf_counter()
    for i, sink in enumerate(sinks):
        params = SamplingParams(max_tokens=max(1, tokens * shares[i] // n), temperature=0)
        engine.submit("completion", PROMPTS[i % len(PROMPTS)], params, sink)
    for sink in sinks:
        sink.done.wait()
    elapsed = time.perf_counter() - start
    return sum(s.generation.completion_tokens for s in sinks if s.generation) / elapsed


def turn_beside_running(
    path: Path, model_id: str, threads: int, tokens: int, gpu_layers: GpuLayers
) -> float:
    """Aggregate tokens/s of a request running in one slot and a conversation's next turn whose
    prefix is cached in a slot apart from it: 4 slots, a fresh engine each time, best of 3."""
    conversation = " ".join(PROMPTS * 6)
    short, full = SamplingParams(max_tokens=8, temperature=0), SamplingParams(tokens, 0)
    best = 0.0
    for _ in range(3):
        engine = BatchedLlamaGenerator(
            path,
            model_id,
            context_length=2048,
            threads=threads,
            slots=4,
            gpu_layers=gpu_layers,
        )
        try:
            for text in (conversation, PROMPTS[1], PROMPTS[2]):  # slots 0, 1 and 2, in turn
                aggregate(engine, [text], short)
            turn = [PROMPTS[3], conversation + " And then,"]  # slot 3 runs; slot 0 is reused
            best = max(best, aggregate(engine, turn, full))
        finally:
            engine.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quantization", choices=["as-is", "q4_0", "q8_0"], default="as-is")
    parser.add_argument(
        "--gpu-layers", default="0", help="layers offloaded to the GPU, or all (a GPU build)"
    )
    args = parser.parse_args()
    gpu: GpuLayers = "all" if args.gpu_layers == "all" else int(args.gpu_layers)
    path, model_id = resolve_model("smollm2")
    if args.quantization != "as-is":
        path = requantized(path, args.quantization, Path.home() / ".cache" / "grifo" / "models")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as isolated:
        raw = isolated.submit(raw_single, str(path), args.threads, args.tokens, gpu).result()
        one, wide = isolated.submit(
            decode_steps, str(path), args.threads, args.concurrency, args.tokens, gpu
        ).result()
    engine = BatchedLlamaGenerator(
        path,
        model_id,
        context_length=2048,
        threads=args.threads,
        slots=args.concurrency,
        gpu_layers=gpu,
    )
    try:
        single = max(grifo_run(engine, 1, args.tokens) for _ in range(3))
        concurrent = max(grifo_run(engine, args.concurrency, args.tokens) for _ in range(2))
        uneven = max(uneven_run(engine, args.concurrency, args.tokens) for _ in range(2))
    finally:
        engine.close()
    turn = turn_beside_running(path, model_id, args.threads, args.tokens, gpu)
    print(
        f"SmolLM2-135M {args.quantization}, {args.threads} thread(s), {args.tokens} tokens, "
        f"GPU layers {args.gpu_layers}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    print("| run | tokens/s | ratio |\n|---|---:|---:|")
    print(f"| raw llama-cpp-python, 1 stream | {raw:.1f} | 1.00 |")
    print(f"| grifo engine, 1 stream | {single:.1f} | {single / raw:.2f} |")
    print(
        f"| grifo engine, {args.concurrency} concurrent (aggregate) | {concurrent:.1f} | "
        f"{concurrent / single:.2f} x grifo single |"
    )
    print(
        f"| grifo engine, {args.concurrency} concurrent asking for 1/{args.concurrency} to all "
        f"of the tokens (aggregate) | {uneven:.1f} | {uneven / single:.2f} x grifo single |"
    )
    print(
        f"| grifo engine, 1 running + 1 turn reusing a prefix cached apart (aggregate) | "
        f"{turn:.1f} | {turn / single:.2f} x grifo single |"
    )
    print(
        f"| llama.cpp alone: one decode step of 1 token / of {args.concurrency} tokens "
        f"| {1000 * one:.2f} ms / {1000 * wide:.2f} ms | "
        f"{args.concurrency * one / wide:.2f} x at most (kernels' ceiling) |"
    )


if __name__ == "__main__":
    main()
