"""Load signals of llama.cpp's C++ `llama-server` from its JSON introspection endpoints.

`/metrics` needs `--metrics`, and recent builds dropped `llamacpp:kv_cache_usage_ratio` from it;
`GET /slots` (on by default in recent builds, off by default in some older ones, answered 501
or 404 when off) and `GET /props` fill in:

- `/slots`: one object per slot. Busy slots are those with `is_processing` true (builds of 2024:
  `state` non-zero); the slots' count is the engine's capacity. Recent builds give each slot
  that has had a task `n_prompt_tokens`, the tokens its KV cache holds (an idle slot keeps its
  last prompt cached for reuse), against the slot's `n_ctx`: their ratio, over all slots, is
  the cache-usage estimate. Builds without `n_prompt_tokens` leave the cache use unknown.
- `/props`: `total_slots` (the capacity, `--parallel`) and `default_generation_settings.n_ctx`,
  for a server whose `/slots` is off.

Both are parsed defensively: anything that is not the expected shape is ignored, field by field
(a wrong type counts as missing), and never raises. Bodies over `MAX_BODY` bytes are not read
(see `proxy.py`), and at most `MAX_SLOTS` slots are looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

MAX_BODY = 4 * 1024 * 1024  # /slots carries each slot's prompt text: large contexts, many slots
MAX_SLOTS = 4096
_MAX_PATH = 1024


@dataclass(frozen=True, slots=True)
class SlotSignals:
    total: int  # slots: the engine's capacity
    busy: int  # slots processing a request
    cache_usage: float | None  # tokens cached in the slots / their context, None if not told


@dataclass(frozen=True, slots=True)
class ServerProps:
    total_slots: int | None
    n_ctx: int | None
    model_path: str | None


def _decode(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        return None
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None


def _int(value: object) -> int | None:
    """A JSON integer (not a bool, not a float), or None."""
    return value if type(value) is int else None


def _busy(slot: dict[str, Any]) -> bool | None:
    processing = slot.get("is_processing")
    if isinstance(processing, bool):
        return processing
    state = _int(slot.get("state"))  # 2024 builds: 0 idle, 1 processing
    return None if state is None else state != 0


def parse_slots(body: bytes) -> SlotSignals | None:
    """The signals in a `GET /slots` answer, or None if it is not a list of llama.cpp slots."""
    slots = _decode(body)
    if not isinstance(slots, list):
        return None
    total = busy = 0
    cached = context = 0
    told = False
    for slot in slots[:MAX_SLOTS]:
        if not isinstance(slot, dict):
            continue
        processing = _busy(slot)
        if processing is None:
            continue  # not a slot as any build writes it
        total += 1
        busy += processing
        n_ctx = _int(slot.get("n_ctx"))
        if n_ctx is None or n_ctx <= 0:
            continue
        context += n_ctx
        tokens = _int(slot.get("n_prompt_tokens"))
        if tokens is not None and tokens >= 0:
            told = True
            cached += min(tokens, n_ctx)
    if total == 0:
        return None
    usage = cached / context if told and context else None
    return SlotSignals(total, busy, usage)


def parse_props(body: bytes) -> ServerProps | None:
    """`total_slots`, the context size and the model path from a `GET /props` answer, or None
    if it has none of them."""
    props = _decode(body)
    if not isinstance(props, dict):
        return None
    total = _int(props.get("total_slots"))
    total = total if total is not None and 0 < total <= MAX_SLOTS else None
    settings = props.get("default_generation_settings")
    n_ctx = _int(settings.get("n_ctx")) if isinstance(settings, dict) else None
    n_ctx = n_ctx if n_ctx is not None and n_ctx > 0 else None
    path = props.get("model_path")
    path = path if isinstance(path, str) and 0 < len(path) <= _MAX_PATH else None
    if total is None and n_ctx is None and path is None:
        return None
    return ServerProps(total, n_ctx, path)
