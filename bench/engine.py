"""Embedded engine throughput: raw llama-cpp-python vs grifo's batching engine, same model/threads.

Single stream: tokens/s of one 128-token completion (prefill included), best of 3.
Concurrent: aggregate tokens/s with N simultaneous requests in the batching engine.
Usage: python bench/engine.py [--threads 1] [--concurrency 8] [--tokens 128] [--quantization q4_0]
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
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from llama_cpp import Llama

from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.engines.batching import BatchedLlamaGenerator
from grifo.point.engines.llama import requantized, resolve_model

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


def raw_single(path: str, threads: int, tokens: int) -> float:
    llm = Llama(
        model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    best = 0.0
    for i in range(3):
        start = time.perf_counter()
        out = llm.create_completion(PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0)
        elapsed = time.perf_counter() - start
        best = max(best, out["usage"]["completion_tokens"] / elapsed)  # type: ignore[index]
    llm.close()
    return best


def grifo_run(engine: BatchedLlamaGenerator, n: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0)
    sinks = [Sink() for _ in range(n)]
    start = time.perf_counter()
    for i, sink in enumerate(sinks):
        engine.submit("completion", PROMPTS[i % len(PROMPTS)], params, sink)
    for sink in sinks:
        sink.done.wait()
    elapsed = time.perf_counter() - start
    return sum(s.generation.completion_tokens for s in sinks if s.generation) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quantization", choices=["as-is", "q4_0", "q8_0"], default="as-is")
    args = parser.parse_args()
    path, model_id = resolve_model("smollm2")
    if args.quantization != "as-is":
        path = requantized(path, args.quantization, Path.home() / ".cache" / "grifo" / "models")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as isolated:
        raw = isolated.submit(raw_single, str(path), args.threads, args.tokens).result()
    engine = BatchedLlamaGenerator(
        path, model_id, context_length=2048, threads=args.threads, slots=args.concurrency
    )
    try:
        single = max(grifo_run(engine, 1, args.tokens) for _ in range(3))
        concurrent = max(grifo_run(engine, args.concurrency, args.tokens) for _ in range(2))
    finally:
        engine.close()
    print(
        f"SmolLM2-135M {args.quantization}, {args.threads} thread(s), {args.tokens} tokens, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    print("| run | tokens/s | ratio |\n|---|---:|---:|")
    print(f"| raw llama-cpp-python, 1 stream | {raw:.1f} | 1.00 |")
    print(f"| grifo engine, 1 stream | {single:.1f} | {single / raw:.2f} |")
    print(
        f"| grifo engine, {args.concurrency} concurrent (aggregate) | {concurrent:.1f} | "
        f"{concurrent / single:.2f} x grifo single |"
    )


if __name__ == "__main__":
    main()
