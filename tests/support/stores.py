"""The real PostgreSQL and Redis on 127.0.0.1 (`.ci/run` starts them), isolated per test, and a
TCP relay in front of either that a test can cut to stage an outage."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator

import psycopg
import pytest
import redis
from psycopg import sql

POSTGRES_URL = os.environ.get(
    "GRIFO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("GRIFO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    schema = f"grifo_test_{secrets.token_hex(4)}"
    yield schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix in the test Redis, its keys deleted afterwards."""
    prefix = f"grifo-test-{secrets.token_hex(4)}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


class TcpRelay:
    """Forwards 127.0.0.1:<port> to a backend; `cut()` drops every connection and refuses new
    ones, `restore()` listens again on the same port."""

    def __init__(self, backend_host: str, backend_port: int) -> None:
        self._backend = (backend_host, backend_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self.restore()

    def url(self, template: str) -> str:
        """`template` (a URL to the backend) pointed at the relay instead."""
        host, port = self._backend
        return template.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                try:
                    listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
                except OSError:
                    pass
                listener.close()
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._backend)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
