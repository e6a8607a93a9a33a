"""A point's response as the pooled client hands it over: its head, then its body read with
back-pressure (`next_chunk`, `read`, `iter_body`) or pushed as it arrives (`deliver`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grifo.http.client import _Connection

_HIGH_WATER = 1024 * 1024


class UpstreamResponse:
    """A response whose head has arrived; the body is read with `read()` or `iter_body()`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: Exception | None = None
        self._on_chunk: Callable[[bytes], None] | None = None  # set by `deliver`
        self._on_end: Callable[[Exception | None], None] | None = None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    # -- fed by the connection --------------------------------------------------------------
    def _feed(self, chunk: bytes) -> None:
        if self._on_chunk is not None:
            self._on_chunk(chunk)
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._conn = None
        self._on_chunk = None  # a piped body's consumer: no cycle left through it
        self._wake()
        self._tell_end()

    def _tell_end(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self._error)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- consumer API -----------------------------------------------------------------------------
    async def next_chunk(self) -> bytes | None:
        """The next body bytes as they arrive (already de-chunked), or None at the end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._conn is not None and self._buffered <= _HIGH_WATER // 2:
                    self._conn.resume()
                return chunk
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def deliver(
        self, on_chunk: Callable[[bytes], None], on_end: Callable[[Exception | None], None]
    ) -> None:
        """Push the body instead of queueing it for `next_chunk`: the bytes already read go to
        `on_chunk` now, then each read as it arrives, from the connection's own callback; the
        end goes to `on_end`, once (None, or the error `next_chunk` would raise)."""
        held, self._chunks, self._buffered = self._chunks, deque(), 0
        self._on_chunk, self._on_end = on_chunk, on_end
        for chunk in held:
            on_chunk(chunk)
        if self._done:
            self._on_chunk = None
            self._tell_end()
        elif self._conn is not None:
            self._conn.resume()  # reads paused at the high-water mark go on

    def pause_reading(self) -> None:
        """Stop reading from the point until `resume_reading` (a slow client: back-pressure)."""
        if self._conn is not None:
            self._conn.pause()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def unread(self, data: bytes) -> None:
        """Put bytes already taken with `next_chunk` back in front of the rest."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield body bytes as they arrive; the connection is closed if the reader stops early."""
        try:
            while (chunk := await self.next_chunk()) is not None:
                yield chunk
        finally:
            self.close()

    @property
    def complete(self) -> bool:
        """The whole body has arrived, well."""
        return self._done and self._error is None

    def take_body(self) -> bytes:
        """The whole body of a `complete` response, at once."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_body()])

    def fail(self, error: Exception) -> None:
        """End the body now with `error` (a deadline): readers get it, the connection closes."""
        if not self._done:
            if self._conn is not None:
                self._conn.abort()
            self._finish(error)

    def close(self) -> None:
        """Abandon the rest of the body: the connection is closed, never reused half-read."""
        if not self._done and self._conn is not None:
            self._conn.abort()
        self._finish(self._error)
