"""One agent run at a point: model step, tool call, tool result, ... until an answer or a limit.

The run is a stream of events (dicts, see README, Agents): `run.started`, then per step a
`model.step` and, for a tool call, `tool.call` and `tool.result` (or `tool.error`), and last
`run.completed` with the run's usage. Limits are checked before a step starts, so the run never
spends past them: steps, tokens (prompt plus completion over all steps), and the deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from grifo.agent.steps import (
    Choice,
    FinalAnswer,
    ToolCall,
    describe,
    parse_step,
    salvage_answer,
    step_schema,
)
from grifo.agent.tools.base import Tool, ToolError, ToolSpec
from grifo.guardrails import injection
from grifo.point.engines.base import Generation, SamplingParams
from grifo.wire import responses
from grifo.wire.requests import AgentRunRequest

Event = dict[str, Any]
# Runs one model step: (messages, params) -> (text, generation), or None if it could not start
# within the token budget given (the prompt alone is too long).
Generate = Callable[
    [list[dict[str, str]], SamplingParams, int], Awaitable[tuple[str, Generation] | None]
]
WITHHELD = "[tool output withheld: it looked like a prompt injection]"
GUARD_HEADER = b"x-grifo-tool-injection"  # the tenant's ToolGuard, set by the gateway


@dataclass(frozen=True, slots=True)
class ToolGuard:
    """The tenant's rule for tool outputs: `flag` reports the injection score, `block` also
    withholds an output scoring at or above `threshold` from the model."""

    mode: str = "block"
    threshold: float = 0.5

    @classmethod
    def parse(cls, header: bytes) -> ToolGuard:
        """From `x-grifo-tool-injection: block;0.5`; anything unreadable means the default."""
        mode, _, threshold = header.decode("latin-1").partition(";")
        try:
            value = float(threshold)
        except ValueError:
            value = 0.0
        if mode not in ("flag", "block") or not 0 < value <= 1:
            return cls()
        return cls(mode, value)

    def header(self) -> bytes:
        return f"{self.mode};{self.threshold:g}".encode()


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine reused from its prefix cache

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        return responses.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class AgentRun:
    def __init__(
        self,
        run_id: str,
        request: AgentRunRequest,
        tools: Mapping[str, Tool],
        generate: Generate,
        guard: ToolGuard,
        deadline: float | None = None,
    ) -> None:
        """`tools` are the run's own (already checked against what the point offers);
        `deadline` is in `time.monotonic()` seconds."""
        self.run_id = run_id
        self.request = request
        self.tools = tools
        self.generate = generate
        self.guard = guard
        self.deadline = deadline
        self.usage = Usage()
        self.steps = 0
        specs = [tool.spec for tool in tools.values()]
        self._specs: dict[str, ToolSpec] = {s.name: s for s in specs}
        choice: Choice = request.tool_choice
        self._schemas = {
            "step": json.dumps(step_schema(specs, choice)),
            "last": json.dumps(step_schema(specs, "none")),
        }
        system = describe(request.instructions, specs, choice)
        self._messages = [{"role": "system", "content": system}]
        self._messages += [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages()
        ]

    async def events(self) -> AsyncGenerator[Event]:
        yield {"type": "run.started", "id": self.run_id, "tools": sorted(self._specs)}
        limits = self.request.limits
        answer, reason = None, "max_steps"
        while self.steps < limits.max_steps:
            if self._late():
                reason = "deadline"
                break
            last = self.steps + 1 == limits.max_steps
            step = await self._model_step(last)
            if step is None:
                reason = "max_tokens"
                break
            text, generation, event = step
            yield event
            if generation.finish_reason == "cancelled":
                reason = "deadline"
                break
            parsed = parse_step(text, self._specs)
            if parsed is None and (last or generation.finish_reason == "length"):
                salvaged = salvage_answer(text)
                parsed = FinalAnswer(salvaged) if salvaged else None
            if isinstance(parsed, FinalAnswer):
                answer, reason = parsed.text, "answered"
                break
            self._messages.append({"role": "assistant", "content": text})
            if parsed is None:
                yield {"type": "step.error", "step": self.steps, "message": "unreadable output"}
                self._messages.append(
                    {"role": "user", "content": "That was not a valid JSON step. Try again."}
                )
                continue
            async for event in self._tool_step(parsed):
                yield event
        yield {
            "type": "run.completed",
            "id": self.run_id,
            "status": "completed" if answer is not None else "incomplete",
            "reason": reason,
            "output": answer,
            "steps": self.steps,
            "usage": self.usage.as_dict(),
        }

    def _late(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    async def _model_step(self, last: bool) -> tuple[str, Generation, Event] | None:
        limits = self.request.limits
        spent = self.usage.prompt_tokens + self.usage.completion_tokens
        room = limits.max_tokens - spent
        if room < 2:
            return None
        temperature = 0.0 if self.request.temperature is None else self.request.temperature
        params = SamplingParams(
            max_tokens=min(limits.max_step_tokens, room - 1),
            temperature=temperature,
            seed=self.request.seed,
            json_schema=self._schemas["last" if last else "step"],
        )
        done = await self.generate(list(self._messages), params, room)
        if done is None:
            return None
        text, generation = done
        self.steps += 1
        self.usage.prompt_tokens += generation.prompt_tokens
        self.usage.completion_tokens += generation.completion_tokens
        self.usage.cached_tokens += generation.cached_tokens
        event = {
            "type": "model.step",
            "step": self.steps,
            "output": text,
            "finish_reason": generation.finish_reason,
            "step_usage": Usage(
                generation.prompt_tokens, generation.completion_tokens, generation.cached_tokens
            ).as_dict(),
            "run_usage": self.usage.as_dict(),
        }
        return text, generation, event

    async def _tool_step(self, call: ToolCall) -> AsyncIterator[Event]:
        step = self.steps
        yield {"type": "tool.call", "step": step, "tool": call.tool, "arguments": call.arguments}
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            if remaining is not None and remaining <= 0:
                raise ToolError("the run's deadline passed")
            result = await asyncio.wait_for(self.tools[call.tool].call(call.arguments), remaining)
        except (ToolError, TimeoutError) as exc:
            message = str(exc) if isinstance(exc, ToolError) else "the run's deadline passed"
            code = exc.code if isinstance(exc, ToolError) else "deadline_exceeded"
            yield {"type": "tool.error", "step": step, "tool": call.tool, "code": code,
                   "message": message}  # fmt: skip
            self._messages.append({"role": "user", "content": f"{call.tool} failed: {message}"})
            return
        score, rules = injection.score(result.text)
        withheld = self.guard.mode == "block" and score >= self.guard.threshold
        seen = WITHHELD if withheld else result.text
        yield {
            "type": "tool.result",
            "step": step,
            "tool": call.tool,
            "output": seen,
            "sources": list(result.sources),
            "injection_score": round(score, 3),
            "injection_rules": rules,
            "withheld": withheld,
        }
        self._messages.append({"role": "user", "content": f"Result of {call.tool}:\n{seen}"})
