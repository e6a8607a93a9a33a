"""The `tools` section of a point: what agent runs placed there may call (see README, Agents):
document search at the site, HTTP APIs and MCP servers, each with the jurisdiction where it
processes what it is sent."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from grifo.config.base import Base, Name

JsonSchema = dict[str, object]


class VectorToolConfig(Base, kw_only=True, frozen=True):
    """Search over documents that live only at this site (an index made by `grifo index`)."""

    name: Name = "search_documents"
    description: str = "Search the documents held at this site; returns the closest passages."
    index: str
    """The index file (SQLite with sqlite-vec) `grifo index <folder> <index>` writes."""
    top_k: Annotated[int, msgspec.Meta(ge=1, le=50)] = 4
    max_result_chars: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 4000


class HttpToolConfig(Base, kw_only=True, frozen=True):
    """An HTTP API the model may call. Egress goes only to this URL's host; a host that
    resolves to a private, loopback, link-local or metadata address is refused unless
    `private: true` lists it as intended."""

    name: Name
    description: str
    url: str
    """http(s)://host[:port]/path; GET sends the arguments as the query, POST as a JSON body."""
    method: Literal["GET", "POST"] = "POST"
    parameters: JsonSchema = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    """JSON Schema of the arguments object."""
    headers: dict[str, str] = {}
    jurisdiction: str | None = None
    """Where the API processes what it is sent (default: the point's own jurisdiction). A run
    may call it only if this is in the run's allowed set."""
    private: bool = False
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    max_result_chars: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 4000


class McpServerConfig(Base, kw_only=True, frozen=True):
    """An MCP server whose tools the model may call (`<name>.<tool>`): started over stdio
    (`command`) or reached over streamable HTTP (`url`)."""

    name: Name
    command: list[str] | None = None
    env: dict[str, str] = {}
    url: str | None = None
    tools: list[str] | None = None
    """Only these of the server's tools (None: all it lists)."""
    jurisdiction: str | None = None
    """Where the server processes what it is sent (default: the point's own jurisdiction)."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 30.0
    max_result_chars: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 4000


class ToolsConfig(Base, kw_only=True, frozen=True):
    """The tools agent runs placed on this point may call (see README, Agents)."""

    vector: list[VectorToolConfig] = []
    http: list[HttpToolConfig] = []
    mcp: list[McpServerConfig] = []
