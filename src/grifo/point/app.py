"""An inference point's HTTP surface: OpenAI-compatible inference plus health, load and metrics.

Every answer names the point and its jurisdiction (`x-grifo-point`, `x-grifo-jurisdiction`), so
the gateway can check each response against what it believes about the point.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import msgspec
from prometheus_client import generate_latest

from grifo.agent.tools.base import Tool
from grifo.audit.signing import RECEIPT_COMMENT, RECEIPT_HEADER, Receipt, Signer, public_b64
from grifo.errors import (
    GrifoError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
)
from grifo.http.message import Request, Response, StreamResponse
from grifo.point.agent_runs import AgentRuns
from grifo.point.engines.base import Generation, Generator, SamplingParams
from grifo.point.metrics import EngineStats, PointMetrics
from grifo.point.runner import BatchGenerator, EngineRunner, GenerationJob, Kind, Payload
from grifo.telemetry.tracing import Tracing
from grifo.wire import responses
from grifo.wire.requests import (
    AGENT_RUNS_PATH,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    decode,
)

log = logging.getLogger("grifo.point")
Route = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass(frozen=True, slots=True)
class PointIdentity:
    name: str
    site: str
    region: str
    jurisdiction: str
    tier: str


class PointApp:
    """Routes for one point; engines run in the `EngineRunner`."""

    def __init__(
        self,
        identity: PointIdentity,
        runner: EngineRunner,
        signer: Signer | None = None,
        tracing: Tracing | None = None,
        tools: Mapping[str, Tool] | None = None,
        tool_jurisdictions: Mapping[str, str] | None = None,
    ) -> None:
        self.identity = identity
        self.runner = runner
        self.agent_runs = AgentRuns(runner, tools or {})
        where = tool_jurisdictions or {}
        self.tool_jurisdictions = {t: where.get(t, identity.jurisdiction) for t in tools or {}}
        self.closers: list[Callable[[], Awaitable[None]]] = []  # run when the point stops
        self.signer = signer
        self.tracing = tracing  # an engine span per generation, under the gateway's attempt
        self.metrics = PointMetrics()
        engine: object = runner.generator  # a batching llama.cpp engine counts its slots' work
        if isinstance(engine, EngineStats):
            self.metrics.watch_engine(engine)
        self._ident_headers = [
            (b"x-grifo-point", identity.name.encode()),
            (b"x-grifo-jurisdiction", identity.jurisdiction.encode()),
        ]
        self._routes: dict[str, tuple[str, Route]] = {
            "/v1/chat/completions": ("POST", self.chat),
            "/v1/completions": ("POST", self.completions),
            "/v1/embeddings": ("POST", self.embeddings),
            AGENT_RUNS_PATH: ("POST", self.agent_runs.handle),
            "/v1/models": ("GET", self.models),
            "/health": ("GET", self.health),
            "/load": ("GET", self.load),
            "/metrics": ("GET", self.prometheus),
        }

    async def handle(self, request: Request) -> Response | StreamResponse:
        try:
            route = self._routes.get(request.path)
            if route is None:
                raise NotFoundError(f"no route {request.path}")
            method, endpoint = route
            if request.method != method:
                raise MethodNotAllowedError(f"{request.path} accepts {method} only")
            response = await endpoint(request)
        except GrifoError as exc:
            response = Response(exc.status, exc.envelope())
        response.headers.extend(self._ident_headers)
        if request.path.startswith("/v1/"):
            self.metrics.requests.labels(request.path, str(response.status)).inc()
        return response

    # -- information ------------------------------------------------------------------------------
    def model_cards(self) -> list[dict[str, object]]:
        cards: list[dict[str, object]] = []
        gen, emb = self.runner.generator, self.runner.embedder
        if gen is not None:
            cards.append(_card(gen.model_id, "chat", gen.context_length))
        if emb is not None:
            cards.append(_card(emb.model_id, "embeddings", 256))
        return cards

    async def models(self, request: Request) -> Response:
        return Response(200, responses.model_list(self.model_cards()))

    async def health(self, request: Request) -> Response:
        ident = self.identity
        body = {
            "status": "ready",
            "name": ident.name,
            "site": ident.site,
            "region": ident.region,
            "jurisdiction": ident.jurisdiction,
            "tier": ident.tier,
            "models": self.model_cards(),
            "tools": self.tool_jurisdictions if self.runner.generator is not None else None,
        }
        if self.signer is not None:
            body["public_key"] = public_b64(self.signer.public_key)
        return Response(200, msgspec.json.encode(body))

    async def load(self, request: Request) -> Response:
        return Response(200, msgspec.json.encode(self.runner.load()))

    async def prometheus(self, request: Request) -> Response:
        return Response(
            200, generate_latest(self.metrics.registry), content_type=b"text/plain; version=0.0.4"
        )

    # -- inference --------------------------------------------------------------------------------
    def _generator(self, model: str) -> Generator | BatchGenerator:
        gen = self.runner.generator
        if gen is None or gen.model_id != model:
            raise ModelNotFoundError(f"the model {model!r} is not served here", param="model")
        return gen

    async def chat(self, request: Request) -> Response | StreamResponse:
        chat = decode(ChatCompletionRequest, request.body)
        gen = self._generator(chat.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in chat.messages
        ]
        params = _params(chat, chat.token_limit(), gen.context_length)
        job, generation, timer = await self._start(request, "chat", messages, params, chat.model)
        frames = responses.ChatFrames(chat.model)
        if not chat.stream:
            text = await _collect(job, timer)
            self._finish(job, generation)
            answer = frames.complete(text, *_totals(generation))
            receipt = self._receipt_header(request, chat.model, generation)
            return Response(200, answer, headers=receipt)

        async def body() -> AsyncIterator[bytes]:
            yield frames.chunk({"role": "assistant", "content": ""})
            async for piece in job.pieces():
                yield frames.chunk({"content": piece})
            yield frames.chunk({}, generation.finish_reason)
            if receipt := self._receipt_comment(request, chat.model, generation):
                yield receipt
            if chat.include_usage:
                yield frames.usage_chunk(*_totals(generation)[1:])
            yield responses.DONE

        return self._stream(job, generation, body(), timer)

    async def completions(self, request: Request) -> Response | StreamResponse:
        comp = decode(CompletionRequest, request.body)
        gen = self._generator(comp.model)
        params = _params(comp, comp.token_limit(), gen.context_length)
        prompt = comp.prompt_text()
        job, generation, timer = await self._start(
            request, "completion", prompt, params, comp.model
        )
        frames = responses.CompletionFrames(comp.model)
        if not comp.stream:
            text = await _collect(job, timer)
            self._finish(job, generation)
            answer = frames.complete(text, *_totals(generation))
            receipt = self._receipt_header(request, comp.model, generation)
            return Response(200, answer, headers=receipt)

        async def body() -> AsyncIterator[bytes]:
            async for piece in job.pieces():
                yield frames.chunk(piece)
            yield frames.chunk("", generation.finish_reason)
            if receipt := self._receipt_comment(request, comp.model, generation):
                yield receipt
            if comp.include_usage:
                yield frames.usage_chunk(*_totals(generation)[1:])
            yield responses.DONE

        return self._stream(job, generation, body(), timer)

    def _receipt(self, request: Request, model: str, generation: Generation) -> bytes | None:
        return self.receipt(request, model, generation.prompt_tokens, generation.completion_tokens)

    def receipt(
        self, request: Request, model: str, prompt_tokens: int, completion_tokens: int
    ) -> bytes | None:
        """This point's signed statement that it processed the request (see `Receipt`)."""
        if self.signer is None:
            return None
        return self.signer.attest(
            Receipt(
                request_id=request.headers.get(b"x-request-id", b"").decode("latin-1"),
                point=self.identity.name,
                jurisdiction=self.identity.jurisdiction,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                ts_ms=int(time.time() * 1000),
            )
        ).encode()

    def _receipt_header(
        self, request: Request, model: str, generation: Generation
    ) -> list[tuple[bytes, bytes]]:
        token = self._receipt(request, model, generation)
        return [] if token is None else [(RECEIPT_HEADER, token)]

    def _receipt_comment(self, request: Request, model: str, generation: Generation) -> bytes:
        """For a stream: an SSE comment before the usage chunk, so the gateway has the receipt
        when it meters."""
        token = self._receipt(request, model, generation)
        return b"" if token is None else RECEIPT_COMMENT + token + b"\n\n"

    async def _start(
        self, request: Request, kind: Kind, payload: Payload, params: SamplingParams, model: str
    ) -> tuple[GenerationJob, Generation, asyncio.TimerHandle | None]:
        """Start a generation; with `x-grifo-deadline-ms` it is cancelled when that passes."""
        span = None
        if self.tracing is not None:
            span = self.tracing.request(request.path, model, request.headers, "")
            span.set_attribute("grifo.point", self.identity.name)
            span.set_attribute("grifo.jurisdiction", self.identity.jurisdiction)
        try:
            job = await self.runner.generate(kind, payload, params)
        except BaseException:
            if span is not None:
                span.end()
            raise
        job.model, job.span = model, span
        timer = None
        deadline_ms = request.headers.get(b"x-grifo-deadline-ms", b"")
        if deadline_ms.isdigit():
            timer = asyncio.get_running_loop().call_later(int(deadline_ms) / 1000, job.cancel)
        return job, job.started_future.result(), timer

    def _stream(
        self,
        job: GenerationJob,
        generation: Generation,
        frames: AsyncIterator[bytes],
        timer: asyncio.TimerHandle | None,
    ) -> StreamResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for frame in frames:
                    yield frame
            except Exception:  # after the head is sent, errors travel in-band
                log.exception("generation failed mid-stream")
                yield responses.engine_error("the engine failed")

        async def on_close(completed: bool) -> None:
            if timer is not None:
                timer.cancel()
            if not completed:
                job.cancel()
            self._finish(job, generation)

        headers = [(b"x-grifo-prompt-tokens", str(generation.prompt_tokens).encode())]
        return StreamResponse(200, body(), headers=headers, on_close=on_close)

    async def embeddings(self, request: Request) -> Response:
        emb_req = decode(EmbeddingRequest, request.body)
        emb = self.runner.embedder
        if emb is None or emb.model_id != emb_req.model:
            raise ModelNotFoundError(
                f"the model {emb_req.model!r} is not served here", param="model"
            )
        if emb_req.dimensions is not None and emb_req.dimensions != emb.dimensions:
            raise InvalidRequestError(
                f"{emb.model_id} produces {emb.dimensions} dimensions", param="dimensions"
            )
        result = await self.runner.embed(emb_req.texts())
        self.metrics.tokens.labels("prompt").inc(result.prompt_tokens)
        body = responses.embeddings(
            emb_req.model, result.vectors, result.prompt_tokens, emb_req.encoding_format
        )
        return Response(200, body)

    def _finish(self, job: GenerationJob, generation: Generation) -> None:
        """A generation is over: count its tokens and times, and end its span."""
        metrics, model = self.metrics, job.model
        metrics.tokens.labels("prompt").inc(generation.prompt_tokens)
        metrics.tokens.labels("completion").inc(generation.completion_tokens)
        done = time.monotonic()
        metrics.duration.labels(model).observe(done - job.created)
        if job.first_piece is not None:
            metrics.ttft.labels(model).observe(job.first_piece - job.created)
            if generation.completion_tokens > 1:
                per_token = (done - job.first_piece) / (generation.completion_tokens - 1)
                metrics.tpot.labels(model).observe(per_token)
        span = job.span
        if span is not None:
            span.set_attribute("gen_ai.usage.input_tokens", generation.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", generation.completion_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [generation.finish_reason])
            if job.first_piece is not None:
                ttft_ms = round((job.first_piece - job.created) * 1000, 3)
                span.set_attribute("grifo.time_to_first_token_ms", ttft_ms)
            span.end()


async def _collect(job: GenerationJob, timer: asyncio.TimerHandle | None) -> str:
    """The whole text; if the request goes away (cancelled), the generation stops too."""
    done = False
    try:
        text = "".join([piece async for piece in job.pieces()])
        done = True
        return text
    finally:
        if timer is not None:
            timer.cancel()
        if not done:
            job.cancel()


def _card(model_id: str, kind: str, context_length: int) -> dict[str, object]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "grifo",
        "kind": kind,
        "context_length": context_length,
    }


def _params(
    req: ChatCompletionRequest | CompletionRequest, limit: int | None, context: int
) -> SamplingParams:
    return SamplingParams(
        max_tokens=min(limit or context, context),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stops(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )


def _totals(generation: Generation) -> tuple[str, int, int, int]:
    g = generation
    return g.finish_reason, g.prompt_tokens, g.completion_tokens, g.cached_tokens
