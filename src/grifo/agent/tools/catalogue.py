"""A point's tools, built from its `tools:` configuration and open for the point's lifetime.

Libraries are imported only for the kinds of tool configured: a point without MCP servers
never loads the MCP SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grifo.agent.tools.base import Tool
from grifo.config.tools import ToolsConfig
from grifo.point.engines.base import Embedder

if TYPE_CHECKING:
    from grifo.agent.tools.mcp_tool import McpServer


class Catalogue:
    def __init__(self, home: str) -> None:
        self.home = home
        self.tools: dict[str, Tool] = {}
        self.jurisdictions: dict[str, str] = {}  # where each tool processes what it is sent
        self._servers: list[McpServer] = []

    @classmethod
    async def open(
        cls, config: ToolsConfig, embedder: Embedder | None, home: str = ""
    ) -> Catalogue:
        """Every configured tool, ready; MCP servers started. `home` is the point's
        jurisdiction, where its own tools (vector search) run. Raises ValueError for a
        configuration that cannot work (a duplicate name, a bad URL, a missing tool)."""
        catalogue = cls(home)
        try:
            await catalogue._open(config, embedder)
        except BaseException:
            await catalogue.aclose()
            raise
        return catalogue

    async def _open(self, config: ToolsConfig, embedder: Embedder | None) -> None:
        if config.vector:
            from grifo.agent.tools.vectors import VectorSearchTool

            if embedder is None:
                from grifo.point.engines.minilm import MiniLMEmbedder

                embedder = MiniLMEmbedder()
            for vector in config.vector:
                self._add(VectorSearchTool(vector, embedder), self.home)
        if config.http:
            from grifo.agent.tools.http_tool import HttpTool

            for http in config.http:
                self._add(HttpTool(http), http.jurisdiction or self.home)
        if config.mcp:
            from grifo.agent.tools.mcp_tool import McpServer

            for server_config in config.mcp:
                server = McpServer(server_config)
                self._servers.append(server)
                await server.start()
                for tool in server.tools:
                    self._add(tool, server_config.jurisdiction or self.home)

    def _add(self, tool: Tool, jurisdiction: str) -> None:
        name = tool.spec.name
        if name in self.tools:
            raise ValueError(f"two tools are named {name!r}; tool names must be unique")
        self.tools[name] = tool
        self.jurisdictions[name] = jurisdiction

    async def aclose(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.aclose()
        for tool in self.tools.values():
            close = getattr(tool, "aclose", None)  # tools holding connections
            if close is not None:
                await close()
