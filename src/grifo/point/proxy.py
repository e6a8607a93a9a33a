"""A point in front of an existing OpenAI-compatible engine (vLLM, llama.cpp's server, ...).

Requests are validated and re-encoded (the allow-list), then forwarded; answers pass through.
`/load` reports the upstream engine's own queue and KV-cache use: from its Prometheus `/metrics`
(vLLM, llama.cpp's `llama-server --metrics`, see `signals.py`), and from `llama-server`'s
`/slots` and `/props` where `/metrics` is missing or has no cache gauge (`llama_server.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from grifo.audit.signing import RECEIPT_COMMENT, RECEIPT_HEADER, Signer
from grifo.errors import GrifoError, ModelNotFoundError
from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response, StreamResponse
from grifo.http.upstream import UpstreamResponse
from grifo.metering.usage import SseSplitter, usage_of
from grifo.point.app import PointApp, PointIdentity
from grifo.point.llama_server import MAX_BODY, ServerProps, SlotSignals, parse_props, parse_slots
from grifo.point.runner import EngineRunner
from grifo.point.signals import EngineSignals, parse
from grifo.wire import requests as wire


class _Card(msgspec.Struct):
    id: str
    kind: str = "chat"
    context_length: int = 0  # grifo points
    max_model_len: int = 0  # vLLM


class _ModelList(msgspec.Struct):
    data: list[_Card]


_LOAD_BUDGET_S = 1.5  # all upstream reads of one `/load`: the health poller waits 2 s for it
_ABSENT_RETRY_S = 30.0  # an endpoint the upstream lacks (404, 405, 501) is asked again after
_PROPS_TTL_S = 60.0  # `/props` is static while the upstream process lives


async def _read_bounded(response: UpstreamResponse, limit: int) -> bytes | None:
    """The whole body, or None (and the connection dropped) once it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    try:
        while (chunk := await response.next_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    finally:
        response.close()  # a no-op once the body is complete
    return b"".join(chunks)


def compose_load(
    metrics: EngineSignals | None,
    slots: SlotSignals | None,
    props: ServerProps | None,
    own_in_flight: int,
) -> dict[str, Any]:
    """A proxy point's `/load` from whatever the upstream told, best source first.

    `/metrics` gives the queue; `/slots` the busy slots and the cache use when `/metrics` has no
    cache gauge. Without `/metrics`, requests this point has sent beyond the engine's slots
    (`/slots`, or `/props`'s `total_slots`) are counted as queued there. With none of them,
    the point reports its own requests in flight and `"engine": "unknown"`.
    """
    capacity = slots.total if slots else (props.total_slots if props else None)
    sources = [
        name for name, got in (("metrics", metrics), ("slots", slots), ("props", props)) if got
    ]
    load: dict[str, Any]
    if metrics is not None:
        load = {
            "in_flight": metrics.running,
            "queued": metrics.waiting,
            "prefix_hit_rate": metrics.prefix_hit_rate,
            "engine": metrics.engine,
        }
        cache = metrics.cache_usage
    elif capacity is not None:
        load = {
            "in_flight": slots.busy if slots else min(own_in_flight, capacity),
            "queued": max(0, own_in_flight - capacity),
            "engine": "llama.cpp",
        }
        cache = None
    else:
        return {"in_flight": own_in_flight, "queued": 0, "engine": "unknown", "sources": []}
    if cache is None and slots is not None:
        cache = slots.cache_usage
    if cache is not None:
        load["cache_usage"] = cache
    if capacity is not None:
        load["capacity"] = capacity
    load["sources"] = sources
    return load


class ProxyPointApp(PointApp):
    def __init__(
        self, identity: PointIdentity, upstream: ConnectionPool, signer: Signer | None = None
    ) -> None:
        super().__init__(identity, EngineRunner(None, None), signer)
        self.upstream = upstream
        self.upstream_models: dict[str, _Card] = {}
        self._routes["/v1/chat/completions"] = ("POST", self._forward_chat)
        self._routes["/v1/completions"] = ("POST", self._forward_completion)
        self._routes["/v1/embeddings"] = ("POST", self._forward_embeddings)
        self._routes["/load"] = ("GET", self._upstream_load)
        del self._routes[wire.AGENT_RUNS_PATH]  # runs need grammar-constrained steps
        self._in_flight = 0
        self._absent: dict[str, float] = {}  # path: when to ask again
        self._props: tuple[float, ServerProps | None] = (0.0, None)  # (valid until, props)

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
        return await self._forward(request, body, body.stream)

    async def _forward_completion(self, request: Request) -> Response | StreamResponse:
        body = wire.decode(wire.CompletionRequest, request.body)
        return await self._forward(request, body, body.stream)

    async def _forward_embeddings(self, request: Request) -> Response | StreamResponse:
        body = wire.decode(wire.EmbeddingRequest, request.body)
        return await self._forward(request, body, False)

    async def _upstream_get(self, path: str, deadline: float) -> bytes | None:
        """The body of the upstream's `GET path` if it answers 200 before `deadline` (monotonic)
        within `MAX_BODY` bytes. An endpoint it lacks is left alone for `_ABSENT_RETRY_S`."""
        now = time.monotonic()
        if self._absent.get(path, 0.0) > now or deadline <= now:
            return None
        try:
            response = await self.upstream.request("GET", path, head_timeout_s=deadline - now)
            body = await asyncio.wait_for(
                _read_bounded(response, MAX_BODY), max(deadline - time.monotonic(), 0.01)
            )
        except (GrifoError, TimeoutError):
            return None
        if response.status in (404, 405, 501):
            self._absent[path] = time.monotonic() + _ABSENT_RETRY_S
        return body if response.status == 200 else None

    async def _server_props(self, deadline: float) -> ServerProps | None:
        until, props = self._props
        if time.monotonic() < until:
            return props
        body = await self._upstream_get("/props", deadline)
        props = parse_props(body) if body is not None else None
        if props is not None:
            self._props = (time.monotonic() + _PROPS_TTL_S, props)
        return props

    async def _upstream_load(self, request: Request) -> Response:
        """The upstream engine's own queue and KV-cache use (see `compose_load`)."""
        deadline = time.monotonic() + _LOAD_BUDGET_S
        text = await self._upstream_get("/metrics", deadline)
        metrics = parse(text.decode("utf-8", "replace")) if text is not None else None
        slots = props = None
        if metrics is None or (metrics.engine == "llama.cpp" and metrics.cache_usage is None):
            body = await self._upstream_get("/slots", deadline)
            slots = parse_slots(body) if body is not None else None
        if metrics is None and slots is None:
            props = await self._server_props(deadline)
        load = compose_load(metrics, slots, props, self._in_flight)
        return Response(200, msgspec.json.encode(load))

    async def _forward(
        self, request: Request, body: wire.InferenceRequest, stream: bool
    ) -> Response | StreamResponse:
        """The upstream's answer, with this point's signed receipt of the tokens it reported
        (a header, or for a stream an SSE comment just before its usage chunk)."""
        if body.model not in self.upstream_models:
            raise ModelNotFoundError(f"the model {body.model!r} is not served here", param="model")
        headers = [(b"content-type", b"application/json")]
        self._in_flight += 1
        streaming = False
        try:
            response = await self.upstream.request(
                "POST", request.path, headers=headers, body=wire.encode(body), head_timeout_s=300
            )
            if not stream or response.status != 200:
                payload = await response.read()
                receipt = self._receipt_of(request, body.model, payload, response.status)
                extra = [] if receipt is None else [(RECEIPT_HEADER, receipt)]
                return Response(response.status, payload, headers=extra)
            streaming = True
        finally:
            if not streaming:
                self._in_flight -= 1

        async def on_close(completed: bool) -> None:
            self._in_flight -= 1  # a stream is in flight until it ends

        return StreamResponse(200, self._signed(request, body.model, response), on_close=on_close)

    def _receipt_of(
        self, request: Request, model: str, payload: bytes, status: int
    ) -> bytes | None:
        usage = usage_of(payload) if status == 200 else None
        if usage is None:
            return None
        return self.receipt(request, model, usage.prompt_tokens, usage.completion_tokens)

    async def _signed(
        self, request: Request, model: str, response: UpstreamResponse
    ) -> AsyncIterator[bytes]:
        if self.signer is None:
            async for data in response.iter_body():
                yield data
            return
        splitter = SseSplitter()
        async for data in response.iter_body():
            out = []
            for event in splitter.feed(data):
                if b'"usage"' in event and (receipt := self._receipt_of(
                    request, model, event[5:].strip(), 200
                )):  # fmt: skip
                    out.append(RECEIPT_COMMENT + receipt + b"\n\n")
                out.append(event)
            if out:
                yield b"".join(out)
        if rest := splitter.rest():
            yield rest
