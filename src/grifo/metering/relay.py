"""Relaying a point's SSE stream to the client while metering it.

Events pass through as they come (no re-encoding), except the usage event: it is metered the
moment it arrives, gets the request's `cost_micros`, and is dropped if the client did not ask
for usage. Content events are counted so a stream cut short can be billed by estimate. After
the head was sent, failures travel in-band as an OpenAI error event. A stream that ended well
closes with its attestation as an SSE comment (`: x-grifo-attestation <token>`).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from grifo.audit.signing import RECEIPT_COMMENT
from grifo.dispatch.first_token import holds_output
from grifo.errors import DeadlineExceededError, GrifoError, PointProtocolError
from grifo.http.message import ChunkSink
from grifo.http.upstream import UpstreamResponse
from grifo.metering.steps import is_step
from grifo.metering.usage import SseSplitter, Usage, run_usage_of, usage_of, with_cost

Meter = Callable[[Usage, str, str], int]  # (usage, status, source) -> cost micro-USD


class _ClientGone(Exception):
    """The client left mid-stream: nothing more is relayed."""


class StreamRelay:
    def __init__(
        self,
        response: UpstreamResponse,
        include_usage: bool,
        meter: Meter,
        point_outcome: Callable[[bool], None],
        attestation: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self._response = response
        self._attestation = attestation
        self._include_usage = include_usage
        self._meter = meter
        self._point_outcome = point_outcome
        header = response.headers.get(b"x-grifo-prompt-tokens", b"0")
        self.prompt_tokens = int(header) if header.isdigit() else 0
        self.events = 0
        self.usage: Usage | None = None
        self.cost: int | None = None
        self.first_event_ns: int | None = None
        self.first_output_ns: int | None = None  # the first token, or an agent run's first step
        self.point_receipt = ""  # the point's signed receipt, when it sends one
        self.broken = False  # the point failed after the stream was committed
        self.run_usage: Usage | None = None  # an agent run's tokens up to its last step
        self.on_step: Callable[[bytes], None] | None = None  # an agent run's step events
        self.ended = False  # the point's `[DONE]` passed: the client has had the whole answer
        self.on_end: Callable[[], None] = _nothing  # called once, when `[DONE]` passes

    def detach(self) -> None:
        """Let go of the answer's callbacks once the stream is done: their object holds this
        relay, and the cycle would leave the stream's objects to the garbage collector (a
        pause of milliseconds under load) instead of freeing them at once."""
        self._meter = _detached
        self._point_outcome = _ignored
        self._attestation = None
        self.on_end = _nothing

    def usage_so_far(self) -> Usage:
        """The point's usage if it came; else an agent run's usage up to its last step; else
        the prompt and the content events seen."""
        return self.usage or self.run_usage or Usage(self.prompt_tokens, self.events)

    async def body(self) -> AsyncIterator[bytes]:
        """The client's body, pulled (`pipe` pushes the same)."""
        splitter = SseSplitter()
        response = self._response
        try:
            # `next_chunk` rather than `iter_body()`: one generator fewer to resume per event
            while (data := await response.next_chunk()) is not None:
                if out := self._relay(splitter, data):
                    yield out
            if out := b"".join(await self._ending(splitter)):
                yield out
        except (GrifoError, ValueError) as exc:
            yield self._failure(exc)
        finally:
            response.close()  # a client that left mid-stream: the point's connection goes too

    async def pipe(self, sink: ChunkSink) -> None:
        """`body()`, pushed: each read of the point's is relayed to the client from the point
        connection's own callback, with no task wake-up, future or generator per event (CPU
        per stream, bench/README.md). Returns once the stream is over; at once when the client
        goes. A client that cannot keep up pauses the reads from the point."""
        push = _Push(self, sink)
        try:
            self._response.deliver(push.on_chunk, push.on_end)
            outcome = await push.ended
            if isinstance(outcome, _ClientGone):
                return
            if outcome is not None:
                raise outcome
            if out := b"".join(await self._ending(push.splitter)):
                sink.send_chunk(out)
        except (GrifoError, ValueError) as exc:
            sink.send_chunk(self._failure(exc))
        finally:
            if push.resuming is not None:
                push.resuming.cancel()
            self._response.close()

    def _relay(self, splitter: SseSplitter, data: bytes) -> bytes:
        """What the client gets of one read from the point."""
        events = splitter.feed(data)
        if len(events) == 1:  # the usual read: one event
            return self._event(events[0])
        return b"".join([self._event(e) for e in events])

    async def _ending(self, splitter: SseSplitter) -> list[bytes]:
        """The point ended the stream well: what the client still gets."""
        out = []
        if rest := splitter.rest():
            out.append(rest)  # an unterminated last event passes through as it came
        self._point_outcome(True)
        if self._attestation is not None and (token := await self._attestation()):
            # An SSE comment after the last event: clients skip it, auditors can read it.
            out.append(b": x-grifo-attestation " + token.encode() + b"\n\n")
        return out

    def _failure(self, exc: GrifoError | ValueError) -> bytes:
        """The in-band error event of a stream broken after its head was sent."""
        if not isinstance(exc, DeadlineExceededError):  # a client deadline is not the point's
            self.broken = True
            self._point_outcome(False)
        error = exc if isinstance(exc, GrifoError) else PointProtocolError(str(exc))
        return b"data: " + error.envelope() + b"\n\n"

    def _event(self, event: bytes) -> bytes:
        if self.first_event_ns is None:
            self.first_event_ns = time.monotonic_ns()
        if not event.startswith(b"data:"):
            if event.startswith(RECEIPT_COMMENT):
                self.point_receipt = event[len(RECEIPT_COMMENT) :].strip().decode("latin-1")
            return event
        payload = event[5:].strip()
        if not payload.startswith(b"{"):
            if not self.ended and payload == b"[DONE]":
                self.ended = True
                self.on_end()
            return event
        if self.on_step is not None and is_step(event):  # whatever text the step holds
            if self.first_output_ns is None:
                self.first_output_ns = time.monotonic_ns()
            self.on_step(payload)
            self.run_usage = run_usage_of(payload) or self.run_usage
        if b'"usage"' in payload:
            return self._usage_event(payload, event)  # passes events without a top-level usage
        if holds_output(payload):  # role-only and finish chunks are not tokens
            self.events += 1
            if self.first_output_ns is None:
                self.first_output_ns = time.monotonic_ns()
        return event

    def _usage_event(self, payload: bytes, event: bytes) -> bytes:
        usage = usage_of(payload)
        if usage is None:
            return event
        self.usage = usage
        self.cost = self._meter(usage, "ok", "point")
        if not self._include_usage:
            return b""  # the client did not ask for the usage chunk; we asked for it to meter
        return b"data: " + with_cost(payload, self.cost) + b"\n\n"


def _detached(usage: Usage, status: str, source: str) -> int:
    raise RuntimeError("a stream is metered once: its relay was detached")


def _ignored(ok: bool) -> None:
    """A detached relay's point outcome: nothing is relayed once the stream is done."""


def _nothing() -> None:
    return None


class _Push:
    """A piped relay's callbacks (`StreamRelay.pipe`): reads in, events out to the client.

    They run in the point connection's callbacks, whose context is that of whichever request
    opened the pooled connection: events are relayed in the context `pipe` was called in, so
    metering and its log lines see this request's context variables (its request id)."""

    def __init__(self, relay: StreamRelay, sink: ChunkSink) -> None:
        self.relay = relay
        self.sink = sink
        self.context = contextvars.copy_context()
        self.splitter = SseSplitter()
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.resuming: asyncio.Task[None] | None = None  # waits out a full client buffer

    def on_chunk(self, data: bytes) -> None:
        if self.ended.done():
            return
        if self.sink.closing:
            self.ended.set_result(_ClientGone())
            return
        try:
            out = self.context.run(self.relay._relay, self.splitter, data)
        except Exception as exc:  # raised from `pipe`, as `body()` would raise it
            self.ended.set_result(exc)
            return
        if out:
            self.sink.send_chunk(out)
        if self.resuming is None and not self.sink.writable.is_set():
            self.relay._response.pause_reading()
            self.resuming = asyncio.get_running_loop().create_task(self._resume())

    def on_end(self, error: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(error)

    async def _resume(self) -> None:
        await self.sink.writable.wait()
        self.resuming = None
        self.relay._response.resume_reading()
