"""grifo's own HTTP server in a background thread with its event loop: how tests run fake
upstreams, points and engines next to a gateway."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from grifo.http.message import Handler
from grifo.http.server import HttpServer

T = TypeVar("T")


class ThreadedServer:
    def __init__(
        self, handler: Handler, host: str = "127.0.0.1", port: int = 0, name: str = "server"
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.server = HttpServer(handler)
        self.port = self.call(self.server.start(host, port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        """Run `coro` on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self, grace_s: float = 0.1) -> None:
        self.call(self.server.close(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
