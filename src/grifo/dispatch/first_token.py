"""When a stream may be committed to the client: at its first token, not at its head.

A point sends its response head, and often a role-only chunk, before the engine has produced
anything. Holding those back until the first token (or the end, or an error event) means a point
that dies during prefill is retried on another point without the client ever noticing.
"""

from __future__ import annotations

import msgspec

from grifo.http.upstream import UpstreamResponse
from grifo.metering.usage import SseSplitter

_HOLD_LIMIT = 64 * 1024  # never hold more than this back, whatever the events look like


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[object] | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    error: object | None = None
    type: str | None = None  # agent-run events


_decoder = msgspec.json.Decoder(_Chunk)


def is_token(event: bytes) -> bool:
    """Whether an SSE event carries output or ends the stream; comments, role-only and empty
    chunks, and an agent run's `run.started`, do not. Anything not understood counts: it is
    passed on at once."""
    if event.startswith(b":"):
        return False
    if not event.startswith(b"data:"):
        return True
    payload = event[5:].strip()
    if payload == b"[DONE]":
        return True
    chunk = _chunk(payload)
    if chunk is not None and chunk.type == "run.started":
        return False  # an agent run is committed at its first model step
    if chunk is None or chunk.error is not None or not chunk.choices:
        return True
    return any(_output(c) or c.finish_reason is not None for c in chunk.choices)


def holds_output(payload: bytes) -> bool:
    """Whether an event's JSON payload holds generated text or tool calls (a token, for
    estimates). A loop rather than `any()` over a generator: this runs for every event of
    every stream."""
    chunk = _chunk(payload)
    if chunk is not None:
        for choice in chunk.choices:
            if _output(choice):
                return True
    return False


def _chunk(payload: bytes) -> _Chunk | None:
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _output(choice: _Choice) -> bool:
    delta = choice.delta
    if choice.text:
        return True
    return delta is not None and bool(delta.content or delta.tool_calls or delta.reasoning_content)


async def await_first_token(response: UpstreamResponse) -> None:
    """Read until the stream's first token, its end or `_HOLD_LIMIT`, then put it all back.

    Raises what the body raises (a dropped connection, a deadline): the caller may still try
    another point, since nothing was sent on.
    """
    splitter = SseSplitter()
    held: list[bytes] = []
    size = 0
    while (chunk := await response.next_chunk()) is not None:
        held.append(chunk)
        size += len(chunk)
        if size > _HOLD_LIMIT or any(is_token(e.strip(b"\n")) for e in splitter.feed(chunk)):
            break
    response.unread(b"".join(held))
