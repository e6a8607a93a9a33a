"""A point in front of an existing OpenAI-compatible engine (vLLM, llama.cpp's server, ...).

Requests are validated and re-encoded (the allow-list), then forwarded; answers pass through.
`/load` reports the upstream engine's own queue and KV-cache use (see `signals.py`).
"""

from __future__ import annotations

import asyncio

import msgspec

from grifo.errors import GrifoError, ModelNotFoundError
from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response, StreamResponse
from grifo.point.app import PointApp, PointIdentity
from grifo.point.runner import EngineRunner
from grifo.point.signals import parse
from grifo.wire import requests as wire


class _Card(msgspec.Struct):
    id: str
    kind: str = "chat"
    context_length: int = 0  # grifo points
    max_model_len: int = 0  # vLLM


class _ModelList(msgspec.Struct):
    data: list[_Card]


class ProxyPointApp(PointApp):
    def __init__(self, identity: PointIdentity, upstream: ConnectionPool) -> None:
        super().__init__(identity, EngineRunner(None, None))
        self.upstream = upstream
        self.upstream_models: dict[str, _Card] = {}
        self._routes["/v1/chat/completions"] = ("POST", self._forward_chat)
        self._routes["/v1/completions"] = ("POST", self._forward_completion)
        self._routes["/v1/embeddings"] = ("POST", self._forward_embeddings)
        self._routes["/load"] = ("GET", self._upstream_load)
        del self._routes[wire.AGENT_RUNS_PATH]  # runs need grammar-constrained steps
        self._in_flight = 0

    async def refresh_models(self) -> None:
        response = await self.upstream.request("GET", "/v1/models", head_timeout_s=10)
        listing = msgspec.json.decode(await response.read(), type=_ModelList)
        self.upstream_models = {card.id: card for card in listing.data}

    def model_cards(self) -> list[dict[str, object]]:
        """The upstream's models; a context length of 0 means the upstream did not say."""
        return [
            {
                "id": card.id,
                "object": "model",
                "created": 0,
                "owned_by": "upstream",
                "kind": card.kind,
                "context_length": card.context_length or card.max_model_len,
            }
            for card in self.upstream_models.values()
        ]

    async def _forward_chat(self, request: Request) -> Response | StreamResponse:
        body = wire.decode(wire.ChatCompletionRequest, request.body)
        return await self._forward(request.path, body, body.stream)

    async def _forward_completion(self, request: Request) -> Response | StreamResponse:
        body = wire.decode(wire.CompletionRequest, request.body)
        return await self._forward(request.path, body, body.stream)

    async def _forward_embeddings(self, request: Request) -> Response | StreamResponse:
        body = wire.decode(wire.EmbeddingRequest, request.body)
        return await self._forward(request.path, body, False)

    async def _upstream_load(self, request: Request) -> Response:
        """The upstream engine's own queue and KV-cache use from its `/metrics` (vLLM,
        llama.cpp's server), or this point's count of requests in flight if it has none."""
        signals = None
        try:
            response = await self.upstream.request("GET", "/metrics", head_timeout_s=1.0)
            text = (await asyncio.wait_for(response.read(), 1.0)).decode("utf-8", "replace")
            signals = parse(text) if response.status == 200 else None
        except (GrifoError, TimeoutError):
            signals = None
        if signals is None:
            load = {"in_flight": self._in_flight, "queued": 0, "engine": "unknown"}
        else:
            load = {
                "in_flight": signals.running,
                "queued": signals.waiting,
                "cache_usage": signals.cache_usage,
                "prefix_hit_rate": signals.prefix_hit_rate,
                "engine": signals.engine,
            }
        return Response(200, msgspec.json.encode(load))

    async def _forward(
        self, path: str, body: wire.InferenceRequest, stream: bool
    ) -> Response | StreamResponse:
        if body.model not in self.upstream_models:
            raise ModelNotFoundError(f"the model {body.model!r} is not served here", param="model")
        headers = [(b"content-type", b"application/json")]
        self._in_flight += 1
        try:
            response = await self.upstream.request(
                "POST", path, headers=headers, body=wire.encode(body), head_timeout_s=300
            )
            if not stream or response.status != 200:
                return Response(response.status, await response.read())
        finally:
            self._in_flight -= 1
        return StreamResponse(200, response.iter_body())
