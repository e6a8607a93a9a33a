"""Deterministic pure-Python engines for fast tests: no compile, no weights.

The fake generator answers with the words of the last message, in order, cycled up to
`max_tokens` (stopping after one pass when they fit); one word is one token, optionally slowed.
The fake embedder hashes words into a small vector.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Sequence

from grifo.point.engines.base import EmbeddingResult, Generation, SamplingParams


class FakeGenerator:
    def __init__(
        self, model_id: str = "fake-chat", context_length: int = 2048, token_delay_s: float = 0.0
    ) -> None:
        self.model_id = model_id
        self.context_length = context_length
        self._delay_s = token_delay_s

    def count_chat_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return sum(len(m["content"].split()) + 1 for m in messages)

    def start_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Generation:
        words = messages[-1]["content"].split() or ["ok"]
        return self._start(self.count_chat_tokens(messages), words, params)

    def start_completion(self, prompt: str, params: SamplingParams) -> Generation:
        words = prompt.split() or ["ok"]
        return self._start(len(words), words, params)

    def _start(self, prompt_tokens: int, words: list[str], params: SamplingParams) -> Generation:
        gen = Generation(prompt_tokens=prompt_tokens, pieces=iter(()))
        gen.pieces = self._pieces(gen, words, params.max_tokens)
        return gen

    def _pieces(self, gen: Generation, words: list[str], limit: int) -> Iterator[str]:
        gen.finish_reason = "length"
        for i in range(limit):
            if gen.cancelled:
                gen.finish_reason = "cancelled"
                return
            if self._delay_s:
                time.sleep(self._delay_s)
            gen.completion_tokens += 1
            yield (" " if i else "") + words[i % len(words)]
            if i + 1 == len(words) and limit > len(words):
                gen.finish_reason = "stop"
                return


class FakeEmbedder:
    def __init__(self, model_id: str = "fake-embed", dimensions: int = 8) -> None:
        self.model_id = model_id
        self.dimensions = dimensions

    def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        vectors = [self._vector(text) for text in texts]
        return EmbeddingResult(vectors, sum(len(t.split()) for t in texts))

    def _vector(self, text: str) -> list[float]:
        acc = [0.0] * self.dimensions
        for word in text.split():
            digest = hashlib.sha256(word.encode()).digest()
            for i in range(self.dimensions):
                acc[i] += digest[i] / 255.0 - 0.5
        norm = math.sqrt(sum(x * x for x in acc)) or 1.0
        return [x / norm for x in acc]
