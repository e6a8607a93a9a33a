"""Session and prefix affinity combined with load.

A session's requests (agent runs, multi-turn chats) prefer the point that served it last, so
the engine's prompt cache for that conversation stays warm. Chats without a session are a
session of their own when their opening — instructions and the start of the first user
message — is at least `prefix_affinity_chars` long: the turns of one conversation share it
(completions: the prompt's first `prefix_affinity_chars` characters). Affinity alone collapses under
load: every turn of a busy session would queue at one point. So the rule is: the session's
point goes first while it is a compliant, healthy candidate whose score is at most
`affinity_slack_ms` worse than the best candidate's (by default two queued requests); past that,
placement picks by score and the session moves to the new point. A point with requests
queued moves its sessions too: the request already waiting takes the next free slot, writing
over the session's cached prefix before the session's request would run.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from grifo.errors import InvalidRequestError
from grifo.placement.scoring import Candidate
from grifo.wire import requests as wire

HEADER = b"x-grifo-session-id"
_INSTRUCTIONS_CHARS = 8192  # of a prefix key's system and developer messages
_USER_CHARS = 256  # of its first user message
_VALID = re.compile(rb"^[A-Za-z0-9_.:-]{1,128}$")


def prefix_key(tenant: str, body: wire.InferenceRequest, min_chars: int) -> str | None:
    """A key for one conversation's requests: its instructions (system and developer
    messages, up to `_INSTRUCTIONS_CHARS`) and the opening of its first user message, when
    they are at least `min_chars` long; for a completion, its prompt's first `min_chars`
    characters. None for shorter ones and embeddings.

    The first user message is part of the key so that many conversations under one long
    system prompt spread over points instead of all following one key."""
    if min_chars <= 0 or isinstance(body, wire.EmbeddingRequest):
        return None
    if isinstance(body, wire.CompletionRequest):
        head = body.prompt_text()[:min_chars]
    else:
        if isinstance(body, wire.ChatCompletionRequest):
            messages = body.messages
        else:
            messages = [wire.Message(role="system", content=body.instructions), *body.messages()]
        parts, size = [], 0
        for message in messages:
            text = message.text()
            if message.role in ("system", "developer"):
                parts.append(text[: _INSTRUCTIONS_CHARS - size])
                size += len(parts[-1])
            else:  # the first user message (or whatever else comes first) ends the opening
                parts.append(text[:_USER_CHARS])
                break
        head = "\x1e".join(parts)
    if len(head) < min_chars:
        return None
    digest = hashlib.blake2b(f"{body.model}\x1f{head}".encode(), digest_size=16).hexdigest()
    return f"{tenant}\x00prefix:{digest}"


def session_key(tenant: str, body_session: str | None, header: bytes | None) -> str | None:
    """The session a request belongs to, per tenant (one tenant cannot steer another's), from
    an agent run's `session_id` or the `x-grifo-session-id` header."""
    if body_session is not None:
        return f"{tenant}\x00{body_session}"
    if header is None:
        return None
    if not _VALID.match(header):
        raise InvalidRequestError(
            "x-grifo-session-id must be 1 to 128 letters, digits or _ . : -",
            param="x-grifo-session-id",
        )
    return f"{tenant}\x00{header.decode()}"


class Affinity:
    def __init__(
        self,
        slack_ms: float,
        capacity: int = 100_000,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slack_ms = slack_ms
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock
        self._points: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key: point, expiry
        self.kept = 0  # requests sent to their session's point
        self.moved = 0  # sessions moved because their point was too loaded or not a candidate

    def order(self, key: str | None, candidates: list[Candidate]) -> list[Candidate]:
        """`candidates` with the session's point first when the rule allows it."""
        if key is None or not candidates:
            return candidates
        entry = self._points.get(key)
        if entry is None:
            return candidates
        name, expiry = entry
        if expiry < self._clock():
            del self._points[key]
            return candidates
        best = candidates[0].score_ms
        for i, candidate in enumerate(candidates):
            if candidate.point.name == name:
                # A point with requests queued has no free slot: its cache would be written
                # over by the request already waiting before this one ran.
                if candidate.score_ms - best <= self.slack_ms and not candidate.point.queued:
                    self.kept += 1
                    return [candidate, *candidates[:i], *candidates[i + 1 :]]
                break
        self.moved += 1
        return candidates

    def remember(self, key: str | None, point: str) -> None:
        if key is None:
            return
        self._points[key] = (point, self._clock() + self._ttl_s)
        self._points.move_to_end(key)
        while len(self._points) > self._capacity:
            self._points.popitem(last=False)

    def __len__(self) -> int:
        return len(self._points)
