"""The gateway pipeline: the only module that knows the order of the stages.

api (decode) → security (key → principal) → placement (allowed set, then rank) → dispatch
(forward with failover inside the set) → metering (usage → cost → ledger) → api (headers).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence

from grifo.admission.budgets import Budgets, prompt_bound
from grifo.admission.deadline import HEADER as DEADLINE_HEADER
from grifo.admission.deadline import POINT_HEADER as DEADLINE_POINT_HEADER
from grifo.admission.deadline import timeout_s
from grifo.admission.idempotency import HEADER as IDEMPOTENCY_HEADER
from grifo.admission.idempotency import Idempotency, fingerprint
from grifo.admission.limits import check_token_limit
from grifo.admission.ratelimit import Limiter
from grifo.audit.log import AuditLog
from grifo.audit.signing import RECEIPT_HEADER
from grifo.config.model import GatewayConfig
from grifo.dispatch.forward import PointPools, RetryBudget, forward
from grifo.errors import (
    DeadlineExceededError,
    GrifoError,
    NoCompliantPointError,
    PermissionDeniedError,
    PointTimeoutError,
)
from grifo.exchange import Exchange
from grifo.guardrails.redact import redact_request
from grifo.http.client import UpstreamResponse
from grifo.http.message import Headers, Request, Response, StreamResponse
from grifo.metering.pricing import cost_micros
from grifo.metering.relay import StreamRelay
from grifo.metering.usage import Usage, usage_of
from grifo.placement.jurisdiction import TIER_HEADER, request_policy, requested_tier
from grifo.placement.scoring import Candidate, PlacementIndex
from grifo.security.keys import KeyRing, Principal
from grifo.store.ledger import LedgerWriter
from grifo.store.records import Amount, LedgerEntry
from grifo.telemetry.metrics import GatewayMetrics
from grifo.topology import PointState
from grifo.wire import requests as wire

log = logging.getLogger("grifo.gateway")


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
    ) -> None:
        self.config = config
        self.points = list(points)
        self.keys = keys
        self.blocs = blocs
        self.ledger = ledger
        self.pools = pools
        self.metrics = metrics
        self.placement = PlacementIndex(self.points, config.placement)
        self.retry_budget = RetryBudget()
        self.idempotency = idempotency
        self.budgets = budgets
        self.audit = audit
        self.limits = limits

    # -- inference ------------------------------------------------------------------------------
    async def infer(self, request: Request, request_id: str) -> Response | StreamResponse:
        received_ns = time.monotonic_ns()
        try:
            return await self._admit(request, request_id, received_ns)
        except GrifoError as exc:
            if self.audit is not None and not exc.audited:
                # Refused before any point saw it: the record says who asked and why not.
                principal = self.keys.peek(request.headers.get(b"authorization"))
                ex = Exchange(request_id, request.path, received_ns, principal, "")
                ex.body, ex.allowed = request.body, principal.allowed
                self.audit.append(ex, None, (0, 0), f"refused:{exc.status}:{exc.code}", 0)
            raise

    async def _admit(
        self, request: Request, request_id: str, received_ns: int
    ) -> Response | StreamResponse:
        principal = self.keys.authenticate(request.headers.get(b"authorization"))
        if principal.role in ("auditor", "admin"):
            raise PermissionDeniedError(
                f"a key with role {principal.role} reads the admin API; inference needs a user "
                "or tenant-admin key"
            )
        body = wire.decode_for(request.path, request.body)
        if principal.models is not None and body.model not in principal.models:
            raise PermissionDeniedError(
                f"this API key may not use the model {body.model!r}",
                param="model",
                code="model_not_allowed",
            )
        raw_key = request.headers.get(IDEMPOTENCY_HEADER)
        if raw_key is None or self.idempotency is None:
            return await self._infer(request, request_id, received_ns, principal, body)
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
        limit = 0 if isinstance(body, wire.EmbeddingRequest) else (body.token_limit() or 256)
        try:
            candidates = self.placement.rank(
                body.model,
                allowed,
                limit,
                self.config.placement.max_attempts,
                requested_tier(principal.tier, request.headers.get(TIER_HEADER)),
            )
        except NoCompliantPointError:
            self.metrics.denials.inc()
            raise
        check_token_limit(body, candidates[0].point)
        ex = Exchange(request_id, request.path, received_ns, principal, body.model)
        ex.body, ex.allowed, ex.data_class = request.body, allowed, data_class
        if any(c.point.jurisdiction in only_redacted for c in candidates):
            # A candidate may see this class only redacted: every attempt gets the redacted text.
            body, found = redact_request(body)
            ex.redacted = ",".join(f"{k}:{n}" for k, n in sorted(found.items())) or "none"
        default_s = min(principal.timeout_s or math.inf, self.config.request_timeout_s)
        ex.timeout_s = timeout_s(request.headers.get(DEADLINE_HEADER), default_s)
        ex.deadline = time.monotonic() + ex.timeout_s
        if self.limits is not None and self.limits.applies(principal):
            tokens = prompt_bound(body) + limit
            ex.lease = await self.limits.acquire(principal, tokens, request_id, ex.timeout_s)
        try:
            if self.budgets is not None and self.budgets.applies(principal):
                ex.reservation = await self.budgets.reserve(
                    principal, body, candidates, request_id, ex.timeout_s
                )
            return await self._dispatch(ex, request, body, candidates)
        except BaseException as exc:
            if ex.point is not None:
                self._leave_point(ex)
            self._release(ex)
            if isinstance(exc, GrifoError) and self.audit is not None:
                kind = "refused" if ex.point is None else "failed"
                self.audit.append(ex, ex.point, (0, 0), f"{kind}:{exc.status}:{exc.code}", 0)
                exc.audited = True
            raise

    async def _dispatch(
        self,
        ex: Exchange,
        request: Request,
        body: wire.InferenceRequest,
        candidates: list[Candidate],
    ) -> Response | StreamResponse:
        stream = (
            isinstance(body, wire.ChatCompletionRequest | wire.CompletionRequest) and body.stream
        )
        upstream_body = wire.upstream_body(body)
        headers: Headers = [
            (b"x-request-id", ex.request_id.encode()),
            (DEADLINE_POINT_HEADER, str(int(ex.timeout_s * 1000)).encode()),
        ]
        ex.dispatched_ns = time.monotonic_ns()
        ours = ex.timeout_s < self.config.request_timeout_s  # the client's deadline, not the point
        try:
            point, response, ex.busy_mark = await forward(
                self.pools,
                candidates,
                (request.path, upstream_body, headers),
                ex.timeout_s,
                self.config.ejection,
                self.retry_budget,
                blame_timeouts=not ours,
            )
        except PointTimeoutError:
            if ours:
                raise DeadlineExceededError(_deadline_message(ex)) from None
            raise
        ex.point = point
        timer = asyncio.get_running_loop().call_later(
            max(ex.remaining_s(), 0), self._expire, ex, response
        )
        ex.cancel_deadline = timer.cancel
        point.gateway_in_flight += 1
        if response.status != 200 or not stream:
            try:
                return await self._whole(ex, response)
            finally:
                point.gateway_in_flight -= 1
        include_usage = isinstance(body, wire.ChatCompletionRequest | wire.CompletionRequest) and (
            body.include_usage
        )
        return self._stream(ex, response, include_usage)

    async def _whole(self, ex: Exchange, response: UpstreamResponse) -> Response:
        assert ex.point is not None
        try:
            payload = await response.read()
        except DeadlineExceededError:
            raise  # the request's own deadline: not the point's failure
        except GrifoError:
            ex.point.failed(time.monotonic(), self.config.ejection)
            raise
        finally:
            ex.cancel_deadline()
        answered_ns = time.monotonic_ns()
        if response.status < 500:  # 5xx were counted by forward; a 4xx is the request's fault
            ex.point.succeeded()
        cost = 0
        if response.status == 200:
            usage = usage_of(payload) or Usage(0, 0)
            ex.answer = payload
            ex.point_receipt = response.headers.get(RECEIPT_HEADER, b"").decode("latin-1")
            cost = self._meter(ex, usage, "ok", "point")
        else:
            self._leave_point(ex)
            self._release(ex)  # the point refused the request: nothing to bill
            if self.audit is not None:
                self.audit.append(ex, ex.point, (0, 0), f"point:{response.status}", 0)
        self.metrics.observe(
            ex.endpoint,
            ex.point.name,
            response.status,
            (time.monotonic_ns() - ex.received_ns) / 1e9,
            None,
        )
        headers = _point_headers(ex.point, cost)
        if ex.redacted:
            headers.append((b"x-grifo-redacted", ex.redacted.encode()))
        if ex.point_receipt:
            headers.append((RECEIPT_HEADER, ex.point_receipt.encode("latin-1")))
        if ex.attestation is not None:
            headers.append((b"x-grifo-attestation", ex.attestation.encode()))
        headers.append(self._overhead(ex, answered_ns))
        return Response(response.status, payload, headers=headers)

    def _overhead(self, ex: Exchange, answered_ns: int) -> tuple[bytes, bytes]:
        """Time the gateway itself added: before dispatch, and after the point answered."""
        added_ns = (ex.dispatched_ns - ex.received_ns) + (time.monotonic_ns() - answered_ns)
        self.metrics.overhead.observe(added_ns / 1e9)
        return (b"x-grifo-overhead-ms", f"{added_ns / 1e6:.3f}".encode())

    def _stream(
        self, ex: Exchange, response: UpstreamResponse, include_usage: bool
    ) -> StreamResponse:
        assert ex.point is not None
        answered_ns = time.monotonic_ns()
        point = ex.point

        def point_outcome(ok: bool) -> None:
            if ok:
                point.succeeded()
            else:
                point.failed(time.monotonic(), self.config.ejection)

        def meter(usage: Usage, status: str, source: str) -> int:
            ex.point_receipt = relay.point_receipt  # the point sends it before its usage
            return self._meter(ex, usage, status, source)

        relay = StreamRelay(response, include_usage, meter, point_outcome, lambda: ex.attestation)

        async def on_close(completed: bool) -> None:
            ex.cancel_deadline()
            point.gateway_in_flight -= 1
            if relay.cost is None:  # the usage event never came: bill what was produced
                status = "client_closed" if not completed else "ok"
                status = "deadline_exceeded" if ex.deadline_hit else status
                self._meter(ex, relay.usage_so_far(), status, "estimated")
            latency_s = (time.monotonic_ns() - ex.received_ns) / 1e9
            first = relay.first_event_ns
            ttft_s = None if first is None else (first - ex.received_ns) / 1e9
            self.metrics.observe(
                ex.endpoint, point.name, 200 if completed else 499, latency_s, ttft_s
            )

        head_cost = cost_micros(point.price(ex.model), 0, relay.prompt_tokens, 0, 0)
        headers = _point_headers(point, head_cost)
        headers.append(self._overhead(ex, answered_ns))
        return StreamResponse(200, relay.body(), headers=headers, on_close=on_close)

    def _meter(self, ex: Exchange, usage: Usage, status: str, source: str) -> int:
        point = ex.point
        assert point is not None
        busy_ns = self._leave_point(ex)
        cost = cost_micros(
            point.price(ex.model),
            point.usd_per_hour_micros,
            usage.prompt_tokens,
            usage.completion_tokens,
            busy_ns,
        )
        self.ledger.record(
            LedgerEntry(
                request_id=ex.request_id,
                ts_ms=int(time.time() * 1000),
                tenant=ex.principal.tenant,
                key_id=ex.principal.key_id,
                endpoint=ex.endpoint,
                model=ex.model,
                point=point.name,
                jurisdiction=point.jurisdiction,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_micros=cost,
                status=status,
                usage_source=source,
                latency_ms=(time.monotonic_ns() - ex.received_ns) / 1e6,
            )
        )
        tokens = usage.prompt_tokens + usage.completion_tokens
        if ex.reservation is not None and self.budgets is not None:
            self.budgets.settle(ex.reservation, Amount(cost, tokens))
        if ex.lease is not None and self.limits is not None:
            self.limits.done(ex.lease, tokens)
        if self.audit is not None:
            record = self.audit.append(
                ex, point, (usage.prompt_tokens, usage.completion_tokens), status, cost
            )
            if self.config.audit.attest:
                ex.attestation = self.audit.attest(record)
        self.metrics.meter(
            ex.principal.tenant,
            ex.principal.key_id,
            point.name,
            ex.model,
            (usage.prompt_tokens, usage.completion_tokens),
            cost,
        )
        return cost

    def _leave_point(self, ex: Exchange) -> int:
        """The request is done at its point: its share of the point's busy time (once)."""
        if ex.busy_share_ns is None:
            assert ex.point is not None
            ex.busy_share_ns = ex.point.busy.leave(ex.busy_mark, time.monotonic_ns())
        return ex.busy_share_ns

    def _expire(self, ex: Exchange, response: UpstreamResponse) -> None:
        """The deadline passed while the point was still answering: stop reading, which closes
        the connection, and the point stops generating for nobody."""
        ex.deadline_hit = True
        response.fail(DeadlineExceededError(_deadline_message(ex)))

    def _release(self, ex: Exchange) -> None:
        """Nothing was produced: give back the reservation and the rate limits' tokens."""
        if ex.reservation is not None and self.budgets is not None:
            self.budgets.release(ex.reservation)
        if ex.lease is not None and self.limits is not None:
            self.limits.done(ex.lease, 0)

    # -- models -----------------------------------------------------------------------------------
    def ready(self) -> bool:
        return all(p.healthy for p in self.points)


def _point_headers(point: PointState, cost: int) -> Headers:
    return [
        (b"x-grifo-point", point.name.encode()),
        (b"x-grifo-jurisdiction", point.jurisdiction.encode()),
        (b"x-grifo-cost-micros", str(cost).encode()),
    ]


def _deadline_message(ex: Exchange) -> str:
    return f"the request's deadline of {ex.timeout_s * 1000:.0f} ms passed (x-grifo-timeout-ms)"
