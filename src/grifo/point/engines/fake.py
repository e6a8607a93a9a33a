"""Deterministic pure-Python engines for fast tests: no compile, no weights.

The fake generator answers with the words of the last message, in order, cycled up to
`max_tokens` (stopping after one pass when they fit); one word is one token, optionally slowed.
Asked for JSON of a schema, it writes the schema's first alternative with every string set to
the last message (so an agent step calls the first tool with the user's words, and a final
answer repeats the last tool result).
The fake embedder hashes words into a small vector.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

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
        if params.json_schema is not None:
            text = json.dumps(instance(json.loads(params.json_schema), " ".join(words)))
            words = text.split(" ")
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


def instance(schema: Any, text: str) -> Any:
    """A value of `schema` (the subset agent steps use): first alternatives, required
    properties, `text` for strings."""
    if not isinstance(schema, dict):
        return None
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return instance(schema[key][0], text)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: instance(props.get(k, {}), text) for k in schema.get("required", [])}
    return {"string": text, "integer": 0, "number": 0, "boolean": False, "array": []}.get(kind)


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
