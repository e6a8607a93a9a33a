"""HTTP/1.1 server: a listening socket, its limits, and draining its connections on close
(`connection.py` serves each one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

from grifo.http.connection import HttpProtocol
from grifo.http.message import Handler


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Limits against oversized and slow clients (see the hostile-input catalogue)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0


class HttpServer:
    """A listening socket and its connections; `close()` drains in-flight work first.

    `limits` is read as each connection is accepted: replacing it applies to new connections.
    """

    def __init__(self, handler: Handler, limits: ServerLimits | None = None) -> None:
        self._handler = handler
        self.limits = limits or ServerLimits()
        self._server: asyncio.Server | None = None
        self.connections: set[HttpProtocol] = set()
        self.draining = False

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, tls: ssl.SSLContext | None = None
    ) -> int:
        """Listen (over TLS with `tls`) and return the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self._handler, self.limits, self),
            host=host,
            port=port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=2048,
            ssl=tls,
        )
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s`, then close all."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for conn in list(self.connections):
                conn.close_if_idle()
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
