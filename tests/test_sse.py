"""Cutting a point's SSE byte stream into events, whatever sizes its reads come in."""

from __future__ import annotations

import itertools

import pytest

from grifo.metering.usage import SseSplitter

EVENTS = [
    b'data: {"choices":[{"delta":{"content":"hi\\n"}}]}\n\n',
    b": x-grifo-point-receipt abc\n\n",
    b"data: [DONE]\n\n",
]


def _split(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    splitter = SseSplitter()
    events = [event for piece in pieces for event in splitter.feed(piece)]
    return events, splitter.rest()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_every_way_of_cutting_the_stream_gives_the_same_events(newline: bytes) -> None:
    stream = b"".join(EVENTS).replace(b"\n", newline)
    for first, second in itertools.combinations(range(1, len(stream)), 2):
        pieces = [stream[:first], stream[first:second], stream[second:]]
        assert _split(pieces) == (EVENTS, b""), pieces
    assert _split([stream[i : i + 1] for i in range(len(stream))]) == (EVENTS, b"")


def test_an_unterminated_event_is_held_back_until_the_end() -> None:
    assert _split([EVENTS[0], b"data: {"]) == ([EVENTS[0]], b"data: {")
    assert _split([b"\n"]) == ([], b"\n")  # a lone newline is not an event


def test_an_event_over_the_size_limit_is_refused() -> None:
    splitter = SseSplitter(max_event_bytes=16)
    with pytest.raises(ValueError, match="size limit"):
        splitter.feed(b"data: " + b"x" * 32)
