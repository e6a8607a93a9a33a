"""A small MCP server (the official SDK's MCPServer, formerly FastMCP) for the agent's MCP tests.

`python mcp_server.py` serves over stdio; `python mcp_server.py --http PORT` serves streamable
HTTP on 127.0.0.1:PORT at /mcp. Every tool is deterministic.
"""

from __future__ import annotations

import json
import os
import sys

import anyio
from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ImageContent, TextContent

ORDERS = {
    "A-1001": {"order_id": "A-1001", "status": "shipped", "items": 2, "total_eur": 59.9},
    "A-1002": {"order_id": "A-1002", "status": "pending", "items": 1, "total_eur": 12.5},
}

server = MCPServer("grifo-test", log_level="WARNING")


@server.tool()
def lookup_order(order_id: str) -> str:
    """Look up an order by its id."""
    order = ORDERS.get(order_id)
    if order is None:
        raise ToolError(f"no order {order_id}")
    return json.dumps(order, sort_keys=True)


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the reason given."""
    raise ToolError(f"refused: {reason}")


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def env(name: str) -> str:
    """The value of one environment variable of the server ("<unset>" when absent)."""
    return os.environ.get(name, "<unset>")


@server.tool()
def repeat(text: str, times: int) -> str:
    """`text` repeated `times` times."""
    return text * times


@server.tool(structured_output=False)
def picture() -> list[TextContent | ImageContent]:
    """A caption and a (truncated) PNG."""
    png = Image(data=b"\x89PNG\r\n\x1a\n", format="png").to_image_content()
    return [TextContent(text="a red dot"), png]


@server.tool()
async def sleep(seconds: float) -> str:
    """Answers after `seconds`."""
    await anyio.sleep(seconds)
    return "awake"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
