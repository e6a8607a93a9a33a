"""Redact personal data from an inference request's text before it leaves its jurisdiction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import msgspec

from grifo.guardrails.pii import redact
from grifo.wire import requests as wire


def redact_request(body: wire.InferenceRequest) -> tuple[wire.InferenceRequest, Counter[str]]:
    """A copy of `body` with personal data replaced in every text it sends to a model, and
    what was found (by kind)."""
    found: Counter[str] = Counter()

    def clean(text: str) -> str:
        result, kinds = redact(text)
        found.update(kinds)
        return result

    if isinstance(body, wire.ChatCompletionRequest):
        messages = [
            msgspec.structs.replace(m, content=_content(m.content, clean)) for m in body.messages
        ]
        return msgspec.structs.replace(body, messages=messages), found
    if isinstance(body, wire.AgentRunRequest):
        given_input = body.input
        cleaned_input: str | list[wire.Message] = (
            clean(given_input)
            if isinstance(given_input, str)
            else [
                msgspec.structs.replace(m, content=_content(m.content, clean)) for m in given_input
            ]
        )
        agent = msgspec.structs.replace(
            body, instructions=clean(body.instructions), input=cleaned_input
        )
        return agent, found
    if isinstance(body, wire.CompletionRequest):
        prompt = body.prompt
        cleaned = clean(prompt) if isinstance(prompt, str) else [clean(p) for p in prompt]
        return msgspec.structs.replace(body, prompt=cleaned), found
    given = body.input
    texts = clean(given) if isinstance(given, str) else [clean(t) for t in given]
    return msgspec.structs.replace(body, input=texts), found


def _content(
    content: str | list[wire.TextPart] | None, clean: Callable[[str], str]
) -> str | list[wire.TextPart] | None:
    if content is None:
        return None
    if isinstance(content, str):
        return clean(content)
    return [msgspec.structs.replace(part, text=clean(part.text)) for part in content]
