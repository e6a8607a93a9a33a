"""`POST /v1/grifo/agent-runs` at a point: run the whole loop here, next to the site's tools.

The run streams its events as SSE (`data: {...}`), or returns them all in one JSON object when
`stream` is false. Its usage is in the last event, for the gateway to meter the run once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping

import msgspec

from grifo.agent.loop import GUARD_HEADER, AgentRun, ToolGuard
from grifo.agent.tools.base import Tool
from grifo.errors import GrifoError, InvalidRequestError, ModelNotFoundError
from grifo.http.message import Request, Response, StreamResponse
from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.runner import EngineRunner
from grifo.wire import responses
from grifo.wire.requests import AgentRunRequest, decode

log = logging.getLogger("grifo.point")


class AgentRuns:
    """The point's agent runs over its engine and its tool catalogue."""

    def __init__(self, runner: EngineRunner, tools: Mapping[str, Tool]) -> None:
        self.runner = runner
        self.tools = tools

    async def handle(self, request: Request) -> Response | StreamResponse:
        body = decode(AgentRunRequest, request.body)
        gen = self.runner.generator
        if gen is None or gen.model_id != body.model:
            raise ModelNotFoundError(f"the model {body.model!r} is not served here", param="model")
        missing = sorted(set(body.tools) - set(self.tools))
        if missing:
            raise InvalidRequestError(
                f"this point does not offer the tools {', '.join(missing)}",
                param="tools",
                code="tool_not_available",
            )
        deadline = None
        deadline_ms = request.headers.get(b"x-grifo-deadline-ms", b"")
        if deadline_ms.isdigit():
            deadline = time.monotonic() + min(int(deadline_ms), 86_400_000) / 1000
        request_id = request.headers.get(b"x-request-id", b"").decode("latin-1")
        run = AgentRun(
            request_id or responses.new_id("run"),
            body,
            {name: self.tools[name] for name in body.tools},
            self._generate,
            ToolGuard.parse(request.headers.get(GUARD_HEADER, b"")),
            deadline,
        )
        if not body.stream:
            events = [event async for event in run.events()]
            final = dict(events[-1])
            final.update({"object": "agent.run", "events": events[:-1]})
            final.pop("type")
            return Response(200, msgspec.json.encode(final))
        return StreamResponse(200, _sse(run))

    async def _generate(
        self, messages: list[dict[str, str]], params: SamplingParams, room: int
    ) -> tuple[str, Generation] | None:
        """One model step within `room` tokens (prompt and completion); None if the prompt
        alone does not fit."""
        for _ in range(2):
            try:
                job = await self.runner.generate("chat", messages, params)
            except InvalidRequestError:  # the conversation outgrew the model's context
                return None
            generation = job.started_future.result()
            fits = room - generation.prompt_tokens
            if fits >= params.max_tokens:
                try:
                    text = "".join([piece async for piece in job.pieces()])
                finally:
                    job.cancel()  # no-op once finished; stops the engine if we were cancelled
                return text, generation
            job.cancel()  # over budget before any token: retry with what is left, if any
            with contextlib.suppress(GrifoError, InterruptedError):
                async for _ in job.pieces():
                    pass
            if fits < 1:
                return None
            params = dataclasses.replace(params, max_tokens=fits)
        return None


async def _sse(run: AgentRun) -> AsyncIterator[bytes]:
    try:
        async with contextlib.aclosing(run.events()) as events:
            async for event in events:
                yield responses.sse(event)
    except Exception:  # after the head is sent, errors travel in-band
        log.exception("agent run failed mid-stream")
        yield responses.engine_error("the agent run failed at the point")
        return
    yield responses.DONE
