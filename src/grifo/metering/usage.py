"""Token usage as reported by a point: from a JSON body, or from the SSE frames of a stream."""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class _Details(msgspec.Struct):
    cached_tokens: int = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None

    def cached(self) -> int:
        details = self.prompt_tokens_details
        return 0 if details is None else _clamp(details.cached_tokens)


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


class _WithRunUsage(msgspec.Struct):
    run_usage: _Usage | None = None


_decoder = msgspec.json.Decoder(_WithUsage)
_run_decoder = msgspec.json.Decoder(_WithRunUsage)
_MAX_TOKENS = 10**9


class Usage(NamedTuple):  # a tuple: built once or twice a request, at a third of a dataclass's cost
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt, reused from the engine's prefix cache


def usage_of(body: bytes) -> Usage | None:
    """The `usage` object of an OpenAI JSON body, clamped to sane values; None if absent."""
    try:
        parsed = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if parsed.usage is None:
        return None
    usage = parsed.usage
    return Usage(_clamp(usage.prompt_tokens), _clamp(usage.completion_tokens), usage.cached())


def run_usage_of(body: bytes) -> Usage | None:
    """An agent run's usage so far, from one of its step events (`run_usage`)."""
    try:
        parsed = _run_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if parsed.run_usage is None:
        return None
    usage = parsed.run_usage
    return Usage(_clamp(usage.prompt_tokens), _clamp(usage.completion_tokens), usage.cached())


def _clamp(n: int) -> int:
    # Not min(max()): on Python 3.11 each parses keywords on every call (~90 ns against ~12).
    return 0 if n < 0 else n if n < _MAX_TOKENS else _MAX_TOKENS


class SseSplitter:
    """Cuts a byte stream into complete SSE events, each ending in a blank line (`\n\n`)."""

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Complete events in `data` plus what was held back; CRLF framing becomes LF."""
        if (
            not self._buffer
            and data.endswith(b"\n\n")
            and data.find(b"\n\n") == len(data) - 2
            and b"\r" not in data
        ):
            return [data]  # the usual read from a point: one whole event
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            # A CR at the very end may be half of a CRLF: keep it until the next feed.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            buffer = buffer[: len(buffer) - len(tail)].replace(b"\r\n", b"\n") + tail
        events: list[bytes] = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            events.append(buffer[start : end + 2])
            start = end + 2
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise ValueError("an SSE event from the point exceeds the size limit")
        return events

    def rest(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


def with_cost(body: bytes, cost_micros: int) -> bytes:
    """A JSON body with `cost_micros` added to its `usage` object (unchanged without one)."""
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if not isinstance(parsed, dict) or not isinstance(parsed.get("usage"), dict):
        return body
    parsed["usage"]["cost_micros"] = cost_micros
    return msgspec.json.encode(parsed)
