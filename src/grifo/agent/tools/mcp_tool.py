"""Tools from MCP servers (`tools.mcp`) through the official `mcp` SDK, over stdio (`command`,
run with only its configured env plus PATH, HOME, LANG) or streamable HTTP (`url`).

The SDK's anyio task groups must be entered and left by one task, so each session lives in a
task of its own; `start`, `call` and `aclose` may be awaited from any task of the loop. A dead
server is restarted on the next call, at most once per call; a call in flight when it died fails
and is not resent (it may have had effects). Errors carry no stack trace or env value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from grifo.agent.tools.base import Tool, ToolArgumentsError, ToolError, ToolResult, ToolSpec
from grifo.config.tools import McpServerConfig

log = logging.getLogger("grifo.agent.mcp")

_INHERITED_ENV = ("PATH", "HOME", "LANG")
_START_S = 30.0  # at least this for spawn, handshake and listing (timeout_s is per request)
_STOP_GRACE_S = 10.0  # the SDK's stdio shutdown takes at most ~6.5 s (stdin close, TERM, KILL)
_ERROR_CHARS = 500
_TRUNCATED = "\n[truncated]"


class _WatchedReadStream:
    """A stdio session's read stream, noting its end: the server's stdout closed (it died)."""

    def __init__(self, inner: Any, conn: _Connection) -> None:
        self._inner, self._conn = inner, conn

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._conn.ended = True
            raise

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Connection:
    """One session and the task that owns it."""

    def __init__(self, start_s: float) -> None:
        self.start_s = start_s
        self.client: Client | None = None
        self.listed: list[mcp_types.Tool] = []
        self.failure: str | None = None
        self.ended = False
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.scope = anyio.CancelScope(deadline=anyio.current_time() + start_s)  # until ready
        self.task: asyncio.Task[None]  # set right after

    @property
    def alive(self) -> bool:
        return self.client is not None and not self.ended  # the task's end resets both


class McpTool:
    """One tool of an MCP server, named `<server>.<tool>`."""

    def __init__(self, server: McpServer, tool: mcp_types.Tool) -> None:
        self._server, self._name = server, tool.name
        self.spec = ToolSpec(
            name=f"{server.config.name}.{tool.name}",
            description=tool.description or tool.title or tool.name,
            parameters=tool.input_schema,
        )

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        return await self._server.call_tool(self._name, arguments)


class McpServer:
    """The session with one configured MCP server, and its allowed tools (after `start`)."""

    def __init__(self, config: McpServerConfig) -> None:
        if (config.command is None) == (config.url is None) or config.command == []:
            raise ValueError(f"MCP server {config.name!r} needs either a command or a url")
        self.config = config
        self.tools: list[Tool] = []
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()  # serializes start, restarts and aclose
        self._open = False

    @property
    def running(self) -> bool:
        return self._conn is not None and self._conn.alive

    async def start(self) -> None:
        """Connect and list the tools; ValueError if the server fails to start or lacks a tool."""
        async with self._lock:
            if self._conn is not None:
                raise RuntimeError(f"MCP server {self.config.name!r} is already started")
            self._conn = conn = await self._connect()
            self._open = True
        offered = {tool.name: tool for tool in conn.listed}
        wanted = list(offered) if self.config.tools is None else self.config.tools
        if missing := [name for name in wanted if name not in offered]:
            await self.aclose()
            raise ValueError(f"MCP server {self.config.name!r} has no tool {', '.join(missing)}")
        self.tools = [McpTool(self, offered[name]) for name in dict.fromkeys(wanted)]

    async def aclose(self) -> None:
        """End the session (and the server's process, for stdio). Safe to call at any time."""
        async with self._lock:
            self._open = False
            conn, self._conn = self._conn, None
            if conn is not None:
                await _stop(conn)

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call the server's tool `name` (its own name, without the server's prefix)."""
        qualified, timeout = f"{self.config.name}.{name}", self.config.timeout_s
        conn = self._conn
        if conn is None or not conn.alive:
            conn = await self._reconnect(conn)
        if (client := conn.client) is None:
            raise self._unavailable()
        try:
            with anyio.fail_after(timeout):
                result = await client.call_tool(name, arguments, read_timeout_seconds=timeout)
        except Exception as exc:
            raise self._call_error(conn, qualified, exc) from None
        text = _result_text(result)
        if result.is_error:
            raise ToolError(f"MCP tool {qualified}: {_bounded(text, _ERROR_CHARS) or 'failed'}")
        return ToolResult(_bounded(text, self.config.max_result_chars), (f"mcp:{qualified}",))

    def _call_error(self, conn: _Connection, qualified: str, exc: Exception) -> ToolError:
        code = exc.code if isinstance(exc, MCPError) else None
        if isinstance(exc, TimeoutError) or code == mcp_types.REQUEST_TIMEOUT:
            return ToolError(f"MCP tool {qualified} took over {self.config.timeout_s:g}s")
        if isinstance(exc, MCPError) and code != mcp_types.CONNECTION_CLOSED:
            message = _bounded(exc.message, _ERROR_CHARS)
            if code == mcp_types.INVALID_PARAMS:
                return ToolArgumentsError(f"MCP tool {qualified}: {message}")
            return ToolError(f"MCP tool {qualified} failed: {message}")
        log.warning("MCP tool %s failed: %s", qualified, _describe(exc))
        conn.ended = True
        return self._unavailable()

    def _unavailable(self) -> ToolError:
        return ToolError(f"MCP server {self.config.name} is unavailable")

    async def _reconnect(self, stale: _Connection | None) -> _Connection:
        """A fresh session in place of `stale` (unless another call has made one already)."""
        async with self._lock:
            current = self._conn
            if current is not None and current is not stale and current.alive:
                return current
            if not self._open:
                raise self._unavailable()
            self._conn = None
            if current is not None:
                await _stop(current)
            log.warning("MCP server %r is gone; reconnecting", self.config.name)
            try:
                self._conn = await self._connect()
            except ValueError as exc:
                log.warning("%s", exc)
                raise self._unavailable() from None
            return self._conn

    async def _connect(self) -> _Connection:
        conn = _Connection(max(self.config.timeout_s, _START_S))
        conn.task = asyncio.create_task(self._own(conn), name=f"mcp-{self.config.name}")
        try:
            await conn.ready.wait()
        except BaseException:
            await _stop(conn)
            raise
        if conn.failure is not None:
            await _stop(conn)
            raise ValueError(f"MCP server {self.config.name!r} could not start: {conn.failure}")
        return conn

    async def _own(self, conn: _Connection) -> None:
        """The session's whole life, in one task: enter, list, wait for `stop`, leave."""
        try:
            with conn.scope:
                async with Client(
                    self._transport(conn),
                    read_timeout_seconds=self.config.timeout_s,
                    client_info=mcp_types.Implementation(name="grifo", version="1"),
                    cache=None,
                ) as client:
                    conn.listed = await _list_tools(client)
                    conn.client, conn.scope.deadline = client, math.inf
                    conn.ready.set()
                    await conn.stop.wait()
        except Exception as exc:
            conn.failure = _describe(exc)
            if conn.ready.is_set():
                log.warning("MCP server %r: session ended (%s)", self.config.name, conn.failure)
        finally:
            conn.ended, conn.client = True, None
            if not conn.ready.is_set():  # the start failed, or ran out of time
                conn.failure = conn.failure or f"no answer within {conn.start_s:g}s"
                conn.ready.set()

    def _transport(self, conn: _Connection) -> Any:
        if self.config.url is not None:
            return streamable_http_client(self.config.url)
        command = self.config.command or []
        env = {key: os.environ[key] for key in _INHERITED_ENV if key in os.environ}
        env |= self.config.env
        params = StdioServerParameters(command=command[0], args=command[1:], env=env)
        return _watched(stdio_client(params, errlog=sys.stderr), conn)


@asynccontextmanager
async def _watched(transport: Any, conn: _Connection) -> AsyncIterator[tuple[Any, Any]]:
    async with transport as (read_stream, write_stream):
        yield _WatchedReadStream(read_stream, conn), write_stream


async def _stop(conn: _Connection) -> None:
    conn.stop.set()
    if not conn.ready.is_set():
        conn.scope.cancel()
    if not (await asyncio.wait({conn.task}, timeout=_STOP_GRACE_S))[0]:
        conn.scope.cancel()  # a graceful end takes too long
        await asyncio.wait({conn.task}, timeout=_STOP_GRACE_S)


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    page = await client.list_tools()
    tools = list(page.tools)
    for _ in range(100):  # a paginator that never ends must not hang the start
        if page.next_cursor is None:
            break
        page = await client.list_tools(cursor=page.next_cursor)
        tools.extend(page.tools)
    return tools


def _describe(exc: BaseException) -> str:  # what went wrong: no stack trace, nothing of env
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"error {exc.code}: {_bounded(exc.message, _ERROR_CHARS)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _result_text(result: mcp_types.CallToolResult) -> str:
    parts = [_content_text(block) for block in result.content]
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, default=str))
    return "\n".join(parts)


def _content_text(block: object) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    resource = getattr(block, "resource", None)  # an embedded resource
    if isinstance(resource, mcp_types.TextResourceContents):
        return resource.text
    uri = getattr(resource or block, "uri", None)
    return f"[{getattr(block, 'type', 'content')}{f' {uri}' if uri else ''}]"


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(_TRUNCATED))] + _TRUNCATED
