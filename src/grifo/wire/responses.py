"""OpenAI response bodies and SSE frames, built from plain values."""

from __future__ import annotations

import base64
import secrets
import struct
import time
from typing import Any

import msgspec

_encode = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached` prompt tokens came from the engine's prefix cache."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def engine_error(message: str) -> bytes:
    """The in-band SSE error event of a stream whose engine failed after its head was sent."""
    error = {"message": message, "type": "server_error", "param": None, "code": "engine_error"}
    return sse({"error": error})


class ChatFrames:
    """Bodies for one chat completion: whole, or as stream chunks."""

    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.model = model
        self.created = int(time.time())

    def complete(
        self, text: str, finish: str, prompt: int, completion: int, cached: int = 0
    ) -> bytes:
        return _encode(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage(prompt, completion, cached),
            }
        )

    def chunk(self, delta: dict[str, str], finish: str | None = None) -> bytes:
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def usage_chunk(self, prompt: int, completion: int, cached: int = 0) -> bytes:
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(prompt, completion, cached),
            }
        )


class CompletionFrames:
    """Bodies for one legacy text completion."""

    def __init__(self, model: str) -> None:
        self.id = new_id("cmpl")
        self.model = model
        self.created = int(time.time())

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def complete(
        self, text: str, finish: str, prompt: int, completion: int, cached: int = 0
    ) -> bytes:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return _encode(self._body([choice], usage=usage(prompt, completion, cached)))

    def chunk(self, text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return sse(self._body([choice]))

    def usage_chunk(self, prompt: int, completion: int, cached: int = 0) -> bytes:
        return sse(self._body([], usage=usage(prompt, completion, cached)))


def embeddings(model: str, vectors: list[list[float]], prompt_tokens: int, fmt: str) -> bytes:
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(v, fmt)}
        for i, v in enumerate(vectors)
    ]
    return _encode(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def _vector(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def model_list(models: list[dict[str, Any]]) -> bytes:
    return _encode({"object": "list", "data": models})
