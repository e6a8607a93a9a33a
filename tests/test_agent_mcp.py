"""Tools from MCP servers, against a real MCP server (tests/support/mcp_server.py, built on the
official SDK) over stdio and over streamable HTTP.

Every test runs on the standard asyncio loop and on uvloop (which points use).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from grifo.agent.tools.base import Tool, ToolError
from grifo.agent.tools.mcp_tool import McpServer
from grifo.config.tools import McpServerConfig

Runner = Callable[[Coroutine[Any, Any, None]], None]
SERVER = Path(__file__).parent / "support" / "mcp_server.py"
SECRET = "sk-live-mcp-4b9d1e"
ALL_TOOLS = ["lookup_order", "add", "fail", "pid", "env", "repeat", "picture", "sleep"]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(asyncio.wait_for(coro, timeout=60))
        else:
            asyncio.run(asyncio.wait_for(coro, timeout=60))

    return runner


def stdio(**kwargs: Any) -> McpServerConfig:
    return McpServerConfig(name="shop", command=[sys.executable, str(SERVER)], **kwargs)


def by_name(server: McpServer) -> dict[str, Tool]:
    return {tool.spec.name: tool for tool in server.tools}


async def call(server: McpServer, tool: str, **arguments: Any) -> str:
    return (await by_name(server)[f"shop.{tool}"].call(arguments)).text


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_lists_the_servers_tools_and_calls_them(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio(max_result_chars=100))
        await server.start()
        try:
            tools = by_name(server)
            assert list(tools) == [f"shop.{name}" for name in ALL_TOOLS]
            add = tools["shop.add"].spec
            assert add.description == "Add two integers."
            assert add.parameters["type"] == "object"
            assert add.parameters["required"] == ["a", "b"]
            assert add.parameters["properties"]["a"]["type"] == "integer"

            result = await tools["shop.add"].call({"a": 2, "b": 40})
            assert result.text == "42"
            assert result.sources == ("mcp:shop.add",)
            order = json.loads(await call(server, "lookup_order", order_id="A-1001"))
            assert order == {
                "items": 2,
                "order_id": "A-1001",
                "status": "shipped",
                "total_eur": 59.9,
            }
            assert await call(server, "picture") == "a red dot\n[image]"
            long = await call(server, "repeat", text="abc", times=1000)
            assert len(long) == 100
            assert long.endswith("\n[truncated]")
            # Called from other tasks than the one that started the server.
            texts = await asyncio.gather(
                *(asyncio.create_task(call(server, "add", a=i, b=1)) for i in range(5))
            )
            assert texts == ["1", "2", "3", "4", "5"]
        finally:
            await asyncio.create_task(server.aclose())

    run(main())


def test_allow_list_keeps_only_the_named_tools(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio(tools=["lookup_order", "add"]))
        await server.start()
        try:
            assert [tool.spec.name for tool in server.tools] == ["shop.lookup_order", "shop.add"]
        finally:
            await server.aclose()

    run(main())


def test_a_tool_the_server_lacks_is_refused_at_start(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio(tools=["add", "delete_everything"]))
        with pytest.raises(ValueError, match="delete_everything"):
            await server.start()
        assert not server.running
        assert server.tools == []
        await server.aclose()  # harmless after a failed start

    run(main())


def test_server_errors_become_tool_errors(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio())
        await server.start()
        try:
            with pytest.raises(ToolError, match="refused: because"):
                await call(server, "fail", reason="because")
            with pytest.raises(ToolError, match="no order A-9"):
                await call(server, "lookup_order", order_id="A-9")
            with pytest.raises(ToolError) as bad:
                await call(server, "add", a="two", b=2)
            assert "Traceback" not in str(bad.value)
            assert await call(server, "add", a=1, b=1) == "2"  # the session survives
        finally:
            await server.aclose()

    run(main())


def test_a_slow_call_times_out_and_the_session_survives(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio(timeout_s=0.5))
        await server.start()
        try:
            with pytest.raises(ToolError, match=r"took over 0\.5s"):
                await call(server, "sleep", seconds=5)
            assert await call(server, "add", a=3, b=4) == "7"
        finally:
            await server.aclose()

    run(main())


def test_the_server_gets_only_its_env(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIFO_MCP_SECRET", SECRET)

    async def main() -> None:
        server = McpServer(stdio(env={"GREETING": "hola"}))
        await server.start()
        try:
            assert await call(server, "env", name="GREETING") == "hola"
            assert await call(server, "env", name="GRIFO_MCP_SECRET") == "<unset>"
            assert await call(server, "env", name="PATH") == os.environ["PATH"]
        finally:
            await server.aclose()

    run(main())


def test_a_dead_stdio_server_is_restarted_on_the_next_call(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio())
        await server.start()
        try:
            first = int(await call(server, "pid"))
            os.kill(first, signal.SIGKILL)
            await until(lambda: not server.running)
            assert await call(server, "add", a=20, b=22) == "42"
            second = int(await call(server, "pid"))
            assert second != first
            assert server.running
        finally:
            await server.aclose()
        await until(lambda: gone(second))

    run(main())


def test_aclose_leaves_no_child_process(run: Runner) -> None:
    async def main() -> None:
        server = McpServer(stdio())
        await server.start()
        pid = int(await call(server, "pid"))
        await server.aclose()
        await until(lambda: gone(pid), seconds=2)
        with pytest.raises(ToolError, match="MCP server shop is unavailable"):
            await call(server, "add", a=1, b=2)

    run(main())


def test_a_server_that_cannot_start_is_refused(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRIFO_MCP_SECRET", SECRET)

    async def main() -> None:
        missing = McpServer(McpServerConfig(name="gone", command=["/nonexistent/mcp-server"]))
        with pytest.raises(ValueError, match="could not start") as error:
            await missing.start()
        assert SECRET not in str(error.value)
        await missing.aclose()
        quits = McpServer(McpServerConfig(name="quits", command=[sys.executable, "-c", "pass"]))
        with pytest.raises(ValueError, match="could not start"):
            await quits.start()
        await quits.aclose()

    run(main())


def test_config_needs_exactly_one_transport() -> None:
    with pytest.raises(ValueError, match="either a command or a url"):
        McpServer(McpServerConfig(name="x"))
    with pytest.raises(ValueError, match="either a command or a url"):
        McpServer(McpServerConfig(name="x", command=["a"], url="http://127.0.0.1:1/mcp"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class HttpServer:
    """The same server as a streamable HTTP app on a loopback port, in a subprocess."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--http", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None, "the MCP HTTP server exited"
                assert time.monotonic() < deadline, "the MCP HTTP server did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.stop()


def test_streamable_http(run: Runner, http_server: HttpServer) -> None:
    async def main() -> None:
        http_server.start()
        config = McpServerConfig(name="shop", url=http_server.url, tools=["add", "fail"])
        server = McpServer(config)
        await server.start()
        try:
            assert [tool.spec.name for tool in server.tools] == ["shop.add", "shop.fail"]
            assert await call(server, "add", a=5, b=6) == "11"
            with pytest.raises(ToolError, match="refused: no"):
                await call(server, "fail", reason="no")
            http_server.stop()
            with pytest.raises(ToolError, match="MCP server shop is unavailable"):
                await call(server, "add", a=1, b=1)
            assert not server.running
            with pytest.raises(ToolError, match="MCP server shop is unavailable"):
                await call(server, "add", a=1, b=1)  # the reconnect fails too
            http_server.start()  # back again: the next call reconnects
            assert await call(server, "add", a=2, b=2) == "4"
        finally:
            await server.aclose()

    run(main())
