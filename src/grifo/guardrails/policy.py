"""A tenant's guardrails on a request's input, with the same verdict on every endpoint and for
streams (it is made before dispatch): personal data allowed, redacted or blocked; prompt
injection allowed, flagged or blocked above a score.

Personal data is looked for in every message; injection in what users and tools wrote (a
tenant's own system and developer messages are its instructions, not an attack on them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from grifo.errors import GuardrailError
from grifo.guardrails import injection
from grifo.guardrails.pii import redact
from grifo.guardrails.redact import redact_request
from grifo.wire import requests as wire


@dataclass(frozen=True, slots=True)
class Guardrails:
    pii: str = "allow"  # allow | redact | block
    injection: str = "allow"  # allow | flag | block
    injection_threshold: float = 0.5
    tool_injection: str = "block"  # flag | block: agent runs' tool outputs

    @property
    def active(self) -> bool:
        return self.pii != "allow" or self.injection != "allow"


@dataclass(slots=True)
class Verdict:
    redacted: Counter[str] = field(default_factory=Counter)
    injection_score: float = 0.0
    injection_rules: list[str] = field(default_factory=list)


def check(body: wire.InferenceRequest, rails: Guardrails) -> tuple[wire.InferenceRequest, Verdict]:
    """The request as it may go on (redacted if the policy says so) and what was found;
    raises GuardrailError when the policy blocks it."""
    verdict = Verdict()
    if rails.injection != "allow":
        worst: tuple[float, list[str]] = (0.0, [])
        for text in _untrusted(body):
            found = injection.score(text)
            if found[0] > worst[0]:
                worst = found
        verdict.injection_score, verdict.injection_rules = worst
        if rails.injection == "block" and worst[0] >= rails.injection_threshold:
            raise GuardrailError(
                f"the request looks like a prompt injection (score {worst[0]:.2f}: "
                f"{', '.join(worst[1])}); this tenant blocks those",
                code="prompt_injection",
            )
    if rails.pii == "block":
        kinds: Counter[str] = Counter()
        for text in _all_texts(body):
            kinds.update(redact(text)[1])
        if kinds:
            raise GuardrailError(
                "the request contains personal data ("
                + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
                + "); this tenant blocks it",
                code="pii_blocked",
            )
    elif rails.pii == "redact":
        body, verdict.redacted = redact_request(body)
    return body, verdict


def _untrusted(body: wire.InferenceRequest) -> list[str]:
    if isinstance(body, wire.ChatCompletionRequest):
        return [m.text() for m in body.messages if m.role in ("user", "tool")]
    if isinstance(body, wire.AgentRunRequest):
        return [m.text() for m in body.messages() if m.role in ("user", "tool")]
    return _all_texts(body)


def _all_texts(body: wire.InferenceRequest) -> list[str]:
    if isinstance(body, wire.ChatCompletionRequest):
        return [m.text() for m in body.messages]
    if isinstance(body, wire.AgentRunRequest):
        return [body.instructions, *(m.text() for m in body.messages())]
    if isinstance(body, wire.CompletionRequest):
        prompt = body.prompt
        return [prompt] if isinstance(prompt, str) else list(prompt)
    return body.texts()
