"""What the agent loop needs from a tool, and the errors a tool may raise.

A tool is described to the model by its `ToolSpec` (name, description, JSON Schema of its
arguments); the loop constrains the model's output to that schema and then awaits `call`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    """JSON Schema of the arguments object (an `object` schema)."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    text: str
    """What the model reads next (already bounded in size by the tool)."""
    sources: tuple[str, ...] = ()
    """Where it came from (document ids, a URL), for the run's events and audit."""


class Tool(Protocol):
    @property
    def spec(self) -> ToolSpec: ...

    async def call(self, arguments: JsonObject) -> ToolResult:
        """Run the tool; raises ToolError (never anything else for a bad call)."""
        ...


class ToolError(Exception):
    """A tool call failed. The message is shown to the model and the caller: it must hold no
    secret and no stack trace."""

    code = "tool_failed"


class ToolArgumentsError(ToolError):
    """The arguments do not match the tool's schema."""

    code = "tool_arguments"


class EgressRefusedError(ToolError):
    """The call would reach a host or address the point's configuration does not allow."""

    code = "egress_refused"


def require_str(arguments: Mapping[str, Any], name: str, max_length: int = 4096) -> str:
    """`arguments[name]` as a non-empty string of at most `max_length` characters."""
    value = arguments.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ToolArgumentsError(f"argument {name!r} must be a non-empty string")
    if len(value) > max_length:
        raise ToolArgumentsError(f"argument {name!r} is longer than {max_length} characters")
    return value
