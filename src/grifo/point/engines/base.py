"""What a point needs from an engine: the protocols and the values they exchange.

Engines here are blocking (llama.cpp and onnxruntime release the GIL); the point runs them in
worker threads. Nothing in this module does I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class EngineUnavailableError(RuntimeError):
    """The engine cannot start as configured with what this host has installed (a model
    package, a GPU build): the point says why in one line and exits."""


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """Vectors for a batch of texts, in input order, and the real number of tokens they used."""

    vectors: list[list[float]]
    prompt_tokens: int


class Embedder(Protocol):
    """An embedding model. `embed` blocks; callers run it in a worker thread."""

    model_id: str
    dimensions: int

    def embed(self, texts: Sequence[str]) -> EmbeddingResult: ...


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated sampling settings for one generation."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_schema: str | None = None
    """Constrain the output to one JSON value of this schema (JSON text); agent steps use it."""


@dataclass(slots=True)
class Generation:
    """A generation in progress: text pieces as they decode, then the final counts.

    `pieces` yields decoded text fragments (never split inside a UTF-8 character or a stop
    string); after it is exhausted `completion_tokens` and `finish_reason` are final.
    """

    prompt_tokens: int
    pieces: Iterator[str]
    completion_tokens: int = 0
    finish_reason: str = "length"
    cancelled: bool = field(default=False)
    cached_tokens: int = 0  # prompt tokens taken from the engine's cache, not computed


class Generator(Protocol):
    """A text-generation model. Every method blocks; callers run it in a worker thread."""

    model_id: str
    context_length: int

    def count_chat_tokens(self, messages: Sequence[dict[str, str]]) -> int: ...

    def start_chat(
        self, messages: Sequence[dict[str, str]], params: SamplingParams
    ) -> Generation: ...

    def start_completion(self, prompt: str, params: SamplingParams) -> Generation: ...
