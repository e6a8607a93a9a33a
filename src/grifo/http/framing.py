"""HTTP/1.1 response heads: status line, date, headers and the body framing in one buffer."""

from __future__ import annotations

import time
from http import HTTPStatus

from grifo.http.message import Headers

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus}


class _DateHeader:
    """The `date:` line, formatted at most once per second."""

    def __init__(self) -> None:
        self._second = 0
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
            self._line = b"date: " + stamp.encode("ascii") + b"\r\n"
        return self._line


_date = _DateHeader()


def response_head(
    status: int,
    content_type: bytes,
    headers: Headers,
    content_length: int | None,
    keep_alive: bool,
) -> bytes:
    """Status line and headers; chunked transfer encoding when `content_length` is None."""
    parts = [
        _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode("ascii"),
        _date.line(),
        b"content-type: ",
        content_type,
        b"\r\n",
    ]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if content_length is None:
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        parts += (b"content-length: ", str(content_length).encode("ascii"), b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
