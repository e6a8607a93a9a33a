"""What the model is asked to write at each step of a run, and reading what it wrote.

A step's output is one JSON object, constrained by the engine to a schema built from the run's
tools: `{"tool": <name>, "arguments": {...}}` to call a tool, or `{"answer": <text>}` to end the
run. Small models cannot be trusted to follow a free-text tool-calling format; a grammar makes
every step parseable, and the schema is the tool's own argument schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from grifo.agent.tools.base import JsonObject, ToolSpec

Choice = Literal["auto", "required", "none"]
_GENERIC_ARGS: JsonObject = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolCall:
    tool: str
    arguments: JsonObject


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    text: str


def step_schema(tools: Sequence[ToolSpec], choice: Choice) -> JsonObject:
    """The JSON Schema of one step's output: a call of one of `tools` (`required`), the answer
    (`none`, or no tools), or either (`auto`)."""
    answer: JsonObject = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    calls = [_call_schema(spec) for spec in tools]
    if choice == "none" or not calls:
        return answer
    options = calls if choice == "required" else [*calls, answer]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _call_schema(spec: ToolSpec) -> JsonObject:
    parameters = dict(spec.parameters) or _GENERIC_ARGS
    return {
        "type": "object",
        "properties": {"tool": {"const": spec.name}, "arguments": parameters},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


def describe(instructions: str, tools: Sequence[ToolSpec], choice: Choice) -> str:
    """The system message: the caller's instructions, the tools and the output format."""
    lines = [instructions.strip()] if instructions.strip() else []
    if tools and choice != "none":
        lines.append("You can call these tools:")
        for spec in tools:
            args = json.dumps(spec.parameters.get("properties", {}), separators=(",", ":"))
            lines.append(f"- {spec.name}: {spec.description} Arguments: {args}")
        lines.append(
            'Reply with one JSON object: {"tool": "<name>", "arguments": {...}} to call a tool, '
            'or {"answer": "<text>"} when you can answer.'
        )
    else:
        lines.append('Reply with one JSON object: {"answer": "<text>"}.')
    return "\n".join(lines)


def parse_step(text: str, tools: Mapping[str, ToolSpec]) -> ToolCall | FinalAnswer | None:
    """The step's call or answer; None when the output is not a complete, known step (cut at
    the token limit, or a tool the run did not ask for)."""
    try:
        value: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("answer"), str):
        return FinalAnswer(value["answer"])
    name, arguments = value.get("tool"), value.get("arguments")
    if isinstance(name, str) and name in tools and isinstance(arguments, dict):
        return ToolCall(name, arguments)
    return None


def salvage_answer(text: str) -> str:
    """The text of an answer cut short by the token limit (`{"answer": "...` unterminated)."""
    head = text.lstrip()
    marker = '"answer"'
    at = head.find(marker)
    if not head.startswith("{") or at < 0:
        return ""
    rest = head[at + len(marker) :].lstrip().removeprefix(":").lstrip()
    if not rest.startswith('"'):
        return ""
    for end in range(len(rest), 1, -1):  # the longest prefix that decodes as a string
        try:
            return str(json.loads(rest[:end] + '"'))
        except ValueError:
            continue
    return ""
