"""Request limits checked before dispatch against what the chosen point says about the model."""

from __future__ import annotations

from grifo.errors import InvalidRequestError
from grifo.topology import PointState
from grifo.wire import requests as wire


def check_token_limit(body: wire.InferenceRequest, point: PointState) -> None:
    if isinstance(body, wire.EmbeddingRequest | wire.AgentRunRequest):
        return  # a run's token limit spans many steps, each within the context
    card = point.models.get(body.model)
    limit = body.token_limit()
    if card is not None and limit is not None and 0 < card.context_length < limit:
        param = (
            "max_completion_tokens"
            if getattr(body, "max_completion_tokens", None)
            else "max_tokens"
        )
        raise InvalidRequestError(
            f"{param} is {limit}, more than the context length of {body.model} "
            f"({card.context_length} tokens)",
            param=param,
        )
