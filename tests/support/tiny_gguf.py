"""A tiny, deterministic, random-weight llama GGUF model generated at test time.

It loads in llama-cpp-python in milliseconds, so engine tests run for real without downloads.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "TINY_BOS_ID",
    "TINY_CHAT_TEMPLATE",
    "TINY_CONTEXT_LENGTH",
    "TINY_EOS_ID",
    "TINY_WORDS",
    "write_tiny_gguf",
]

TINY_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "and",
    "of",
    "to",
    "in",
    "is",
    "it",
    "hello",
    "world",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "cat",
    "sun",
    "moon",
    "red",
    "blue",
    "yes",
    "no",
)
"""Words that tokenize to exactly one token each (as ``"▁word"``) when preceded by a space."""

TINY_CONTEXT_LENGTH = 512
TINY_UNK_ID = 0
TINY_BOS_ID = 1
TINY_EOS_ID = 2
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML-like; the markers are not special tokens, they simply tokenize as characters."""

_SPACE = "\u2581"  # SentencePiece's word-boundary marker "▁"
_N_EMBD = 64
_N_HEAD = 4
_N_FF = 128
_N_LAYER = 2
_RMS_EPS = 1e-5

# Residual dimension 0 carries a constant "anchor" (set in every token embedding, never written by
# a layer), so column 0 of ``output.weight`` acts as a per-token logit bias: whole words are
# favoured, and control, unknown and byte tokens (except newline) are pushed far down so that even
# sampled output stays readable and never ends early on ``</s>``.
_ANCHOR = 4.0
_WORD_BIAS = 0.15
_SUPPRESS_BIAS = -6.0
_EMBD_STD = 0.2
_LAYER_STD = 0.1
_OUTPUT_STD = 0.2

_NORMAL = int(gguf.TokenType.NORMAL)
_UNKNOWN = int(gguf.TokenType.UNKNOWN)
_CONTROL = int(gguf.TokenType.CONTROL)
_BYTE = int(gguf.TokenType.BYTE)

F32Array = npt.NDArray[np.float32]


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Token strings, scores and types; ids are list positions and strings are unique."""
    entries: dict[str, tuple[float, int]] = {
        "<unk>": (0.0, _UNKNOWN),
        "<s>": (0.0, _CONTROL),
        "</s>": (0.0, _CONTROL),
    }
    # Every byte has a token, so any UTF-8 input tokenizes (a missing byte token makes
    # llama.cpp throw a C++ exception through the C API, which aborts the process).
    for byte in range(256):
        entries[f"<0x{byte:02X}>"] = (0.0, _BYTE)
    # The space is spelled "▁" in SentencePiece vocabularies, never as an ASCII space.
    for char in [_SPACE, *(chr(code) for code in range(0x21, 0x7F))]:
        entries.setdefault(char, (-float(len(entries)), _NORMAL))
    # The SentencePiece merge only joins pieces that are themselves in the vocabulary, so every
    # prefix "▁w", "▁wo", ... of a word is a token too; longer pieces score higher.
    for word in TINY_WORDS:
        for end in range(1, len(word) + 1):
            entries.setdefault(_SPACE + word[:end], (float(end), _NORMAL))
    tokens = list(entries)
    if len(set(tokens)) != len(tokens):  # pragma: no cover - guarded by the dict above
        raise AssertionError("duplicate token strings abort llama.cpp")
    return tokens, [score for score, _ in entries.values()], [kind for _, kind in entries.values()]


def _output_bias(tokens: list[str], types: list[int]) -> F32Array:
    whole_words = {_SPACE + word for word in TINY_WORDS}
    bias = np.zeros(len(tokens), dtype=np.float32)
    for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if token in whole_words:
            bias[token_id] = _WORD_BIAS
        elif kind != _NORMAL and token != "<0x0A>":
            bias[token_id] = _SUPPRESS_BIAS
    return bias


def _tensors(seed: int, tokens: list[str], types: list[int]) -> dict[str, F32Array]:
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> F32Array:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    n_vocab = len(tokens)
    embd = normal((n_vocab, _N_EMBD), _EMBD_STD)
    embd[:, 0] = _ANCHOR
    tensors: dict[str, F32Array] = {"token_embd.weight": embd}
    for layer in range(_N_LAYER):
        blk = f"blk.{layer}"
        attn_output = normal((_N_EMBD, _N_EMBD), _LAYER_STD)
        attn_output[0, :] = 0.0  # keep the anchor dimension untouched
        ffn_down = normal((_N_EMBD, _N_FF), _LAYER_STD)
        ffn_down[0, :] = 0.0
        tensors |= {
            f"{blk}.attn_norm.weight": np.ones(_N_EMBD, dtype=np.float32),
            f"{blk}.attn_q.weight": normal((_N_EMBD, _N_EMBD), _LAYER_STD),
            f"{blk}.attn_k.weight": normal((_N_EMBD, _N_EMBD), _LAYER_STD),
            f"{blk}.attn_v.weight": normal((_N_EMBD, _N_EMBD), _LAYER_STD),
            f"{blk}.attn_output.weight": attn_output,
            f"{blk}.ffn_norm.weight": np.ones(_N_EMBD, dtype=np.float32),
            f"{blk}.ffn_gate.weight": normal((_N_FF, _N_EMBD), _LAYER_STD),
            f"{blk}.ffn_up.weight": normal((_N_FF, _N_EMBD), _LAYER_STD),
            f"{blk}.ffn_down.weight": ffn_down,
        }
    output = normal((n_vocab, _N_EMBD), _OUTPUT_STD)
    output[:, 0] = _output_bias(tokens, types)
    tensors["output_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
    tensors["output.weight"] = output
    return tensors


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` and return it; the same seed gives identical bytes."""
    tokens, scores, types = _vocab()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("grifo-tiny-llama")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(TINY_CONTEXT_LENGTH)
    writer.add_embedding_length(_N_EMBD)
    writer.add_block_count(_N_LAYER)
    writer.add_feed_forward_length(_N_FF)
    writer.add_head_count(_N_HEAD)
    writer.add_head_count_kv(_N_HEAD)
    writer.add_rope_dimension_count(_N_EMBD // _N_HEAD)
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(TINY_BOS_ID)
    writer.add_eos_token_id(TINY_EOS_ID)
    writer.add_unk_token_id(TINY_UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    for name, tensor in _tensors(seed, tokens, types).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
