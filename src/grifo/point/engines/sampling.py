"""Picking a sequence's next token from llama.cpp's logits: the sampler chain a request's
settings call for, and the candidates array it runs on."""

from __future__ import annotations

import ctypes
import functools
import random
from typing import Any

from grifo.errors import InvalidRequestError
from grifo.point.engines.base import SamplingParams


def chain(internals: Any, model: Any, params: SamplingParams) -> Any:
    """llama.cpp's sampler chain for `params` (llama-cpp-python's `internals`, the engine's
    model); None for plain greedy decoding, which needs none (`Candidates` takes the argmax).
    Refuses a JSON schema llama.cpp cannot turn into a grammar."""
    if params.temperature <= 0 and params.json_schema is None:
        return None
    sampler = internals.LlamaSampler()
    if params.json_schema is not None:  # first: the others choose among allowed tokens
        sampler.add_grammar(model, _grammar(params.json_schema))
    if params.temperature <= 0:
        sampler.add_greedy()
        return sampler
    if params.presence_penalty or params.frequency_penalty:
        sampler.add_penalties(
            model.n_vocab(), 64, 1.0, params.frequency_penalty, params.presence_penalty
        )
    sampler.add_top_k(40)
    sampler.add_top_p(params.top_p, 1)
    sampler.add_min_p(0.05, 1)
    sampler.add_temp(params.temperature)
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    sampler.add_dist(seed & 0xFFFFFFFF)
    return sampler


class Candidates:
    """Picks a sequence's next token from its logits, reusing one candidates array.

    `llama_sampler_sample` fills a freshly allocated array of every token's (id, logit, p)
    for each token it picks: with SmolLM2's 49,152-token vocabulary, 590 KB of new pages and
    ~150 µs a token, ~1.2 ms of every step of 8 sequences. Here the array is allocated once and
    refilled from the logits with numpy; a greedy pick is numpy's argmax (the first of equal
    logits, as llama.cpp's greedy sampler picks), with no sampler chain at all.
    """

    def __init__(self, capi: Any, n_vocab: int) -> None:
        import numpy as np

        self._np, self._capi, self._n_vocab = np, capi, n_vocab
        token_data = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        assert token_data.itemsize == ctypes.sizeof(capi.llama_token_data)
        fresh = np.zeros(n_vocab, dtype=token_data)  # every id in order, p = 0
        fresh["id"] = np.arange(n_vocab, dtype=np.int32)
        array = fresh.copy()
        self._data = array.ctypes.data_as(capi.llama_token_data_p)
        # Plain float32 views: numpy copies structured arrays field by field, 12x slower.
        self._fresh, self._array = (a.view(np.float32).reshape(n_vocab, 3) for a in (fresh, array))
        self._cur = capi.llama_token_data_array(data=self._data, size=n_vocab)

    def sample(self, chain: Any, ctx: Any, index: int) -> int:
        """The token picked by `chain` (None: greedy) from the logits of batch row `index`."""
        pointer = self._capi.llama_get_logits_ith(ctx, index)
        logits = self._np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        if chain is None:
            return int(logits.argmax())
        self._np.copyto(self._array, self._fresh)
        self._array[:, 1] = logits
        cur = self._cur  # samplers sort, shrink and may repoint it: reset every time
        cur.data, cur.size, cur.selected, cur.sorted = self._data, self._n_vocab, -1, False
        self._capi.llama_sampler_apply(chain.sampler, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise RuntimeError("the sampler chain picked no token")
        token = int(cur.data[cur.selected].id)
        self._capi.llama_sampler_accept(chain.sampler, token)
        return token


@functools.lru_cache(maxsize=64)
def _grammar(json_schema: str) -> Any:
    """llama.cpp's grammar for a JSON Schema (converted once per schema)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json_schema, verbose=False)
    except Exception as exc:  # the converter rejects schema features it does not support
        raise InvalidRequestError(f"the output schema is not supported: {exc}") from None
