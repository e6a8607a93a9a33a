"""The generated tiny GGUF model: deterministic bytes, real loads and generation in llama.cpp."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_cpp import Llama
from llama_cpp.llama_types import (
    ChatCompletionRequestMessage,
    CreateChatCompletionResponse,
    CreateCompletionResponse,
)

from tests.support.tiny_gguf import TINY_CONTEXT_LENGTH, TINY_WORDS, write_tiny_gguf

pytestmark = pytest.mark.engine


def _load(path: Path, n_threads: int = 1) -> Llama:
    return Llama(
        model_path=str(path),
        n_ctx=TINY_CONTEXT_LENGTH,
        n_threads=n_threads,
        verbose=False,
        seed=0,
    )


def _complete(
    llm: Llama, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0, seed: int = 0
) -> CreateCompletionResponse:
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    assert not isinstance(out, Iterator)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Llama]:
    model = _load(tiny_model)
    yield model
    model.close()


def test_same_seed_gives_identical_bytes(tmp_path: Path, tiny_model: Path) -> None:
    again = write_tiny_gguf(tmp_path / "again.gguf", seed=0)
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert again == tmp_path / "again.gguf"
    assert _sha256(again) == _sha256(tiny_model)
    assert _sha256(other) != _sha256(tiny_model)
    assert again.stat().st_size == other.stat().st_size < 1_000_000


def test_loads_and_completes(tiny_model: Path) -> None:
    model = _load(tiny_model)
    try:
        out = _complete(model, "hello")
    finally:
        model.close()
    choice = out["choices"][0]
    assert isinstance(choice["text"], str)
    assert choice["text"].strip()
    # Control tokens (</s> included) are pushed far down, so generation runs to max_tokens.
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 16


def test_greedy_output_is_identical_across_fresh_instances(tiny_model: Path) -> None:
    texts = []
    for n_threads in (1, 2):
        model = _load(tiny_model, n_threads=n_threads)
        try:
            texts.append(_complete(model, "the quick brown fox")["choices"][0]["text"])
        finally:
            model.close()
    assert texts[0] == texts[1]


def test_sampled_output_stays_printable(llm: Llama) -> None:
    text = _complete(llm, "hello world", max_tokens=64, temperature=1.0, seed=7)["choices"][0][
        "text"
    ]
    assert text
    assert all(char.isprintable() or char == "\n" for char in text)


def test_chat_completion(llm: Llama) -> None:
    messages: list[ChatCompletionRequestMessage] = [{"role": "user", "content": "hello"}]
    out = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0)
    assert not isinstance(out, Iterator)
    response: CreateChatCompletionResponse = out
    message = response["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"]
    assert response["usage"]["completion_tokens"] > 0


def test_chat_completion_streams_the_same_text(llm: Llama) -> None:
    messages: list[ChatCompletionRequestMessage] = [{"role": "user", "content": "the dog"}]
    whole = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0)
    assert not isinstance(whole, Iterator)
    stream = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0, stream=True)
    assert isinstance(stream, Iterator)
    chunks = list(stream)
    assert len(chunks) > 2
    streamed = "".join(str(chunk["choices"][0]["delta"].get("content") or "") for chunk in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]


def test_words_are_single_tokens_and_round_trip(llm: Llama) -> None:
    sentence = " ".join(TINY_WORDS)
    tokens = llm.tokenize(sentence.encode(), add_bos=False)
    assert len(tokens) == len(TINY_WORDS)
    assert llm.detokenize(tokens).decode().strip() == sentence


def test_any_utf8_text_tokenizes(llm: Llama) -> None:
    text = "Grüße,\tzebra ✓ 日本\n"
    tokens = llm.tokenize(text.encode(), add_bos=False)
    assert llm.detokenize(tokens).decode().removeprefix(" ") == text
