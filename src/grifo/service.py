"""The gateway pipeline: the only module that knows the order of the stages.

api (decode) → security (key → principal) → placement (allowed set, then rank) → dispatch
(forward with failover inside the set) → metering (usage → cost → ledger) → api (headers).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from grifo.admission.budgets import Budgets, prompt_bound
from grifo.admission.deadline import HEADER as DEADLINE_HEADER
from grifo.admission.deadline import POINT_HEADER as DEADLINE_POINT_HEADER
from grifo.admission.deadline import timeout_s
from grifo.admission.idempotency import HEADER as IDEMPOTENCY_HEADER
from grifo.admission.idempotency import Idempotency, fingerprint
from grifo.admission.limits import check_token_limit
from grifo.admission.ratelimit import Limiter
from grifo.admission.shedding import HEADER as PRIORITY_HEADER
from grifo.admission.shedding import Admission, request_priority
from grifo.agent.loop import GUARD_HEADER as TOOL_GUARD_HEADER
from grifo.agent.loop import ToolGuard
from grifo.audit.log import AuditLog
from grifo.config.model import GatewayConfig
from grifo.dispatch.forward import Dispatcher, Plan, PointPools
from grifo.errors import (
    DeadlineExceededError,
    GrifoError,
    NoCompliantPointError,
    PermissionDeniedError,
    PointTimeoutError,
    UpstreamError,
    caused_by,
)
from grifo.exchange import Exchange
from grifo.guardrails import policy as guardrails
from grifo.guardrails.redact import redact_request
from grifo.http.message import Headers, Request, Response, StreamResponse
from grifo.metering.answer import Answering, deadline_message
from grifo.placement.affinity import HEADER as SESSION_HEADER
from grifo.placement.affinity import Affinity, prefix_key, session_key
from grifo.placement.jurisdiction import TIER_HEADER, request_policy, requested_tier
from grifo.placement.runs import capped, tool_jurisdictions, with_tools
from grifo.placement.scoring import Candidate, PlacementIndex
from grifo.security.keys import KeyRing, Principal
from grifo.store.ledger import LedgerWriter
from grifo.telemetry.fabric import FabricCollector
from grifo.telemetry.metrics import GatewayMetrics
from grifo.telemetry.peers import Peers
from grifo.telemetry.spans import end_with, name_model, placed
from grifo.telemetry.tracing import CURRENT, Tracing, failed
from grifo.topology import PointState
from grifo.wire import requests as wire

log = logging.getLogger("grifo.gateway")
Placement = tuple[float, str, str, str, str, list[Candidate], list[tuple[PointState, str]]]


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        points: Sequence[PointState],
        keys: KeyRing,
        blocs: Mapping[str, frozenset[str]],
        ledger: LedgerWriter,
        pools: PointPools,
        metrics: GatewayMetrics,
        idempotency: Idempotency | None = None,
        budgets: Budgets | None = None,
        audit: AuditLog | None = None,
        limits: Limiter | None = None,
        admission: Admission | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.points = list(points)
        self.keys = keys
        self.blocs = blocs
        self.ledger = ledger
        self.pools = pools
        self.metrics = metrics
        self.placement = PlacementIndex(self.points, config.placement)
        self.affinity = Affinity(config.placement.affinity_slack_ms)
        self.tracing = tracing
        self.dispatcher = Dispatcher(pools, config.dispatch, config.ejection, tracing)
        self.admission = admission
        self.answers = Answering(config, ledger, metrics, budgets, audit, limits, admission)
        metrics.registry.register(FabricCollector(self))
        self.idempotency = idempotency
        self.budgets = budgets
        self.audit = audit
        self.limits = limits
        self.peers: Peers | None = None  # the other workers of `serve --workers`, if any
        # The last placement decisions, for the dashboard: (time, request id, tenant, model,
        # the point that answered, the ranked candidates, attempts before the answer's).
        self.placements: deque[Placement] = deque(maxlen=50)

    # -- inference ------------------------------------------------------------------------------
    async def infer(self, request: Request, request_id: str) -> Response | StreamResponse:
        received_ns = time.monotonic_ns()
        span = None
        if self.tracing is not None:
            span = self.tracing.request(request.path, "", request.headers, request_id)
        CURRENT.set(span)
        self.answers.serving += 1
        try:
            response = await self._admit(request, request_id, received_ns)
        except GrifoError as exc:
            if self.audit is not None and not exc.audited:
                # Refused before any point saw it: the record says who asked and why not.
                principal = self.keys.peek(request.headers.get(b"authorization"))
                ex = Exchange(request_id, request.path, received_ns, principal, "")
                ex.body, ex.allowed = request.body, principal.allowed
                self.audit.append(ex, None, (0, 0), f"refused:{exc.status}:{exc.code}", 0)
            if span is not None:
                failed(span, exc.status, exc.code)
                span.end()
            raise
        except BaseException:
            if span is not None:
                span.end()
            raise
        finally:
            self.answers.serving -= 1
        if span is not None:
            end_with(span, response)
        return response

    def _admit(
        self, request: Request, request_id: str, received_ns: int
    ) -> Coroutine[Any, Any, Response | StreamResponse]:
        """Who asks, for what: the rest of the request's way, to await (a plain call, so the
        request's coroutines are one level shallower on each of their resumptions)."""
        principal = self.keys.authenticate(request.headers.get(b"authorization"))
        if principal.role in ("auditor", "admin"):
            raise PermissionDeniedError(
                f"a key with role {principal.role} reads the admin API; inference needs a user "
                "or tenant-admin key"
            )
        body = wire.decode_for(request.path, request.body)
        if (span := CURRENT.get()) is not None:
            name_model(span, body.model, principal.tenant)
        if principal.models is not None and body.model not in principal.models:
            raise PermissionDeniedError(
                f"this API key may not use the model {body.model!r}",
                param="model",
                code="model_not_allowed",
            )
        raw_key = request.headers.get(IDEMPOTENCY_HEADER)
        if raw_key is None or self.idempotency is None:
            return self._infer(request, request_id, received_ns, principal, body)
        return self._once(request, request_id, received_ns, principal, body, raw_key)

    async def _once(
        self,
        request: Request,
        request_id: str,
        received_ns: int,
        principal: Principal,
        body: wire.InferenceRequest,
        raw_key: bytes,
    ) -> Response | StreamResponse:
        """A request with an idempotency key: answered once, replayed after."""
        assert self.idempotency is not None
        print_ = fingerprint(request.path, wire.encode(body))
        claim = self.idempotency.claim(principal.tenant, raw_key, print_, request_id)
        if isinstance(claim, Response):
            return claim
        try:
            response = await self._infer(request, request_id, received_ns, principal, body)
        except BaseException:
            self.idempotency.release(claim)
            raise
        return self.idempotency.seal(claim, response)

    async def _infer(
        self,
        request: Request,
        request_id: str,
        received_ns: int,
        principal: Principal,
        body: wire.InferenceRequest,
    ) -> Response | StreamResponse:
        data_class, allowed, only_redacted = request_policy(principal, request.headers, self.blocs)
        verdict = None
        if principal.guardrails.active:
            body, verdict = guardrails.check(body, principal.guardrails)
        limit = 0 if isinstance(body, wire.EmbeddingRequest) else (body.token_limit() or 256)
        tier = requested_tier(principal.tier, request.headers.get(TIER_HEADER))
        priority = request_priority(principal.priority, request.headers.get(PRIORITY_HEADER))
        session = self._session(request, principal, body)
        root = CURRENT.get()
        placing = None if root is None else self._child(root, "placement")
        try:
            body, candidates = self._place(body, allowed, limit, tier, session)
        except NoCompliantPointError:
            self.metrics.denials.inc()
            if placing is not None:
                placing.end()
            raise
        if placing is not None:
            placed(placing, allowed, data_class, tier, candidates)
        check_token_limit(body, candidates[0].point)
        ex = Exchange(request_id, request.path, received_ns, principal, body.model)
        ex.body, ex.allowed, ex.data_class = request.body, allowed, data_class
        if verdict is not None:
            ex.verdict = verdict
            if verdict.redacted:
                ex.redacted = ",".join(f"{k}:{n}" for k, n in sorted(verdict.redacted.items()))
        ex.span = root
        ex.tier = tier or "any"
        ex.session = session
        if only_redacted and _places(body, candidates) & only_redacted and not ex.redacted:
            # A candidate (or a run's tool) may see this class only redacted: every attempt
            # gets the redacted text.
            body, found = redact_request(body)
            ex.redacted = ",".join(f"{k}:{n}" for k, n in sorted(found.items())) or "none"
        default_s = min(principal.timeout_s or math.inf, self.config.request_timeout_s)
        ex.timeout_s = timeout_s(request.headers.get(DEADLINE_HEADER), default_s)
        ex.deadline = time.monotonic() + ex.timeout_s
        if self.limits is not None and self.limits.applies(principal):
            tokens = prompt_bound(body) + limit
            ex.lease = await self.limits.acquire(principal, tokens, request_id, ex.timeout_s)
        try:
            await self.answers.catch_up()  # admitted and dispatched with the turn's others
            candidates = await self._hold(ex, body, candidates, priority)
            return await self._dispatch(ex, request, body, candidates)
        except BaseException as exc:
            if ex.point is not None:
                self.answers.leave_point(ex)
            self.answers.release(ex)
            self.answers.free_slot(ex, ok=not isinstance(exc, UpstreamError))
            if isinstance(exc, GrifoError) and self.audit is not None:
                kind = "refused" if ex.point is None else "failed"
                self.audit.append(ex, ex.point, (0, 0), f"{kind}:{exc.status}:{exc.code}", 0)
                exc.audited = True
            raise

    def _session(
        self, request: Request, principal: Principal, body: wire.InferenceRequest
    ) -> str | None:
        """The session the request belongs to (see placement/affinity.py), if any."""
        run_session = body.session_id if isinstance(body, wire.AgentRunRequest) else None
        session = session_key(principal.tenant, run_session, request.headers.get(SESSION_HEADER))
        opening = self.config.placement.prefix_affinity_chars
        if session is None and len(request.body) >= opening:  # else its text is too short
            session = prefix_key(principal.tenant, body, opening)
        return session

    def _place(
        self,
        body: wire.InferenceRequest,
        allowed: frozenset[str] | None,
        limit: int,
        tier: str | None,
        session: str | None,
    ) -> tuple[wire.InferenceRequest, list[Candidate]]:
        """The ranked candidates (an agent run's only where its tools are, a session's point
        first while the affinity rule allows), and the body to send them."""
        attempts = self.config.placement.max_attempts
        run = body if isinstance(body, wire.AgentRunRequest) else None
        whole = session is not None or run is not None  # filtered or reordered below
        candidates = self.placement.rank(
            body.model, allowed, limit, None if whole else attempts, tier
        )
        if run is not None:
            candidates = with_tools(candidates, run.tools, allowed)
            body = capped(run, candidates)
        return body, self.affinity.order(session, candidates)[:attempts]

    async def _hold(
        self,
        ex: Exchange,
        body: wire.InferenceRequest,
        candidates: list[Candidate],
        priority: int,
    ) -> list[Candidate]:
        """Reserve the worst case in the budgets, then wait for a point's concurrency slot:
        the candidates with the point given the slot first."""
        principal = ex.principal
        span = None if ex.span is None else self._child(ex.span, "admission")
        try:
            if self.budgets is not None and self.budgets.applies(principal):
                ex.reservation = await self.budgets.reserve(
                    principal, body, candidates, ex.request_id, ex.timeout_s
                )
            if self.admission is not None:
                candidates = await self.admission.enter(
                    principal.tenant, priority, candidates, ex.remaining_s()
                )
                ex.slot = candidates[0].point.name
            return candidates
        finally:
            if span is not None:
                span.end()

    async def _dispatch(
        self,
        ex: Exchange,
        request: Request,
        body: wire.InferenceRequest,
        candidates: list[Candidate],
    ) -> Response | StreamResponse:
        stream = not isinstance(body, wire.EmbeddingRequest) and body.stream
        upstream_body = wire.upstream_body(body)
        headers: Headers = [
            (b"x-request-id", ex.request_id.encode()),
            (DEADLINE_POINT_HEADER, str(int(ex.timeout_s * 1000)).encode()),
        ]
        if isinstance(body, wire.AgentRunRequest):
            rails = ex.principal.guardrails
            guard = ToolGuard(rails.tool_injection, rails.injection_threshold)
            headers.append((TOOL_GUARD_HEADER, guard.header()))
        ex.dispatched_ns = time.monotonic_ns()
        ours = ex.timeout_s < self.config.request_timeout_s  # the client's deadline, not the point
        run = isinstance(body, wire.AgentRunRequest)  # tools have effects: never run it twice
        hedge = ex.tier in self.config.dispatch.hedge_tiers and not run
        # Positional: a class called with keywords builds a dict for them (~140 ns a call).
        plan = Plan(stream, ex.deadline, not ours, hedge, not run)  # blame_timeouts, measured
        if ex.span is not None:
            plan.span = self._child(ex.span, "dispatch", {"grifo.hedged": hedge})
        try:
            answer = await self.dispatcher.forward(
                candidates, (request.path, upstream_body, headers), plan
            )
        except PointTimeoutError:
            if ours and time.monotonic() >= ex.deadline - 0.001:
                late = DeadlineExceededError(deadline_message(ex))
                raise caused_by(late, None)  # noqa: B904 (see caused_by)
            raise
        finally:
            if plan.span is not None:
                plan.span.end()
        point, response = answer.point, answer.response
        if ex.slot is not None and ex.slot != point.name:
            self.answers.free_slot(ex, ok=False)  # the point given the slot failed the request
        ex.point, ex.busy_mark, ex.tried = point, answer.busy_mark, answer.tried
        self.affinity.remember(ex.session, point.name)
        self.metrics.placed(_reason(len(candidates), answer.tried))
        self.placements.append(
            (
                time.time(),
                ex.request_id,
                ex.principal.tenant,
                ex.model,
                point.name,
                candidates,
                answer.tried,
            )
        )
        if answer.payload is not None:
            try:
                return await self.answers.whole(ex, answer)
            finally:
                point.left()
        timer = asyncio.get_running_loop().call_later(
            max(ex.remaining_s(), 0), self.answers.expire, ex, response
        )
        ex.cancel_deadline = timer.cancel
        include_usage = not isinstance(body, wire.EmbeddingRequest) and body.include_usage
        if b"x-grifo-prompt-tokens" not in response.headers:  # an engine that may not say
            ex.prompt_estimate = prompt_bound(body) // _BYTES_PER_TOKEN
        return self.answers.stream(ex, response, include_usage)

    def _child(self, parent: Any, name: str, attributes: dict[str, Any] | None = None) -> Any:
        assert self.tracing is not None
        return self.tracing.child(parent, name, attributes)

    # -- models -----------------------------------------------------------------------------------
    def ready(self) -> bool:
        return all(p.healthy for p in self.points if p.source == "static")  # not registered ones


_BYTES_PER_TOKEN = 4  # a usual tokenizer's average on English text


def _places(body: wire.InferenceRequest, candidates: list[Candidate]) -> set[str]:
    """Where the request's content may be processed: its candidates, and a run's tools."""
    places = {c.point.jurisdiction for c in candidates}
    if isinstance(body, wire.AgentRunRequest):
        places |= tool_jurisdictions(candidates, body.tools)
    return places


def _reason(candidates: int, tried: list[tuple[PointState, str]]) -> str:
    """Why the request's point: for `grifo_placement_decisions_total{reason}`."""
    if tried:
        return "hedged" if any(outcome == "hedge-lost" for _, outcome in tried) else "retried"
    return "only_compliant" if candidates == 1 else "best_score"
