"""Turning a point's committed answer into the client's response: meter it once (ledger,
budget settlement, rate-limit correction, audit record, metrics) and add grifo's headers."""

from __future__ import annotations

import time
from collections.abc import Awaitable

from grifo.admission.budgets import Budgets
from grifo.admission.ratelimit import Limiter
from grifo.admission.shedding import Admission
from grifo.audit.batch import BatchAttester
from grifo.audit.log import AuditLog
from grifo.audit.signing import RECEIPT_HEADER
from grifo.config.model import GatewayConfig
from grifo.dispatch.forward import Answer
from grifo.errors import DeadlineExceededError
from grifo.exchange import Exchange
from grifo.http.message import Headers, Response, StreamResponse
from grifo.http.upstream import UpstreamResponse
from grifo.metering.pricing import cost_micros
from grifo.metering.relay import StreamRelay
from grifo.metering.steps import record_whole_run, step_recorder
from grifo.metering.turns import next_turn, now
from grifo.metering.usage import Usage, usage_of, with_cost
from grifo.store.ledger import LedgerWriter
from grifo.store.records import Amount, LedgerEntry
from grifo.telemetry.metrics import GatewayMetrics
from grifo.telemetry.spans import metered
from grifo.topology import PointState
from grifo.wire.requests import AGENT_RUNS_PATH

# Endpoints whose time per output token is the point's own speed (an agent run's includes
# its tools' time, an embedding has no output tokens).
_LEARNS_FROM = frozenset({"/v1/chat/completions", "/v1/completions"})


class Answering:
    def __init__(
        self,
        config: GatewayConfig,
        ledger: LedgerWriter,
        metrics: GatewayMetrics,
        budgets: Budgets | None,
        audit: AuditLog | None,
        limits: Limiter | None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.metrics = metrics
        self.budgets = budgets
        self.audit = audit
        self.limits = limits
        self.admission = admission
        self.attester = None if audit is None else BatchAttester(audit.signer)
        self.serving = 0  # requests between their receipt and their answer (`Gateway.infer`)

    def catch_up(self) -> Awaitable[None]:
        """Let the other requests of this loop turn catch up: they go through admission and
        dispatch together, and their answers out together, and the loop wakes fewer times per
        request (bench/README.md: more req/s at load for one more loop turn of latency). A lone
        request has no one to wait for. To await (a plain call: one coroutine fewer a
        request's every resumption goes through)."""
        return next_turn() if self.serving > 1 else now()

    async def whole(self, ex: Exchange, answer: Answer) -> Response:
        assert ex.point is not None
        assert answer.payload is not None
        response, payload = answer.response, answer.payload
        answered_ns = time.monotonic_ns()
        if response.status < 500:  # 5xx were counted by dispatch; a 4xx is the request's fault
            ex.point.succeeded()
        cost, output_tokens = 0, 0
        if response.status == 200:
            usage = usage_of(payload) or Usage(0, 0)
            output_tokens = usage.completion_tokens
            ex.answer = payload
            receipt = response.headers.get(RECEIPT_HEADER)
            if receipt is not None:
                ex.point_receipt = receipt.decode("latin-1")
            if ex.endpoint == AGENT_RUNS_PATH:
                record_whole_run(payload, step_recorder(self.audit, self.metrics, ex, ex.point))
            cost = self.meter(ex, usage, "ok", "point")
            if ex.endpoint == AGENT_RUNS_PATH:  # as a streamed run's usage event says it
                payload = with_cost(payload, cost)
        else:
            self.leave_point(ex)
            self.release(ex)  # the point refused the request: nothing to bill
            self.free_slot(ex, ok=response.status < 500)
            if self.audit is not None:
                self.audit.append(ex, ex.point, (0, 0), f"point:{response.status}", 0)
        self.metrics.observe(
            ex.endpoint,
            ex.point.name,
            ex.model,
            response.status,
            ((time.monotonic_ns() - ex.received_ns) / 1e9, None),
            output_tokens,
        )
        headers = _point_headers(ex.point, cost)
        _request_headers(ex, headers)
        if ex.point_receipt:
            headers.append((RECEIPT_HEADER, ex.point_receipt.encode("latin-1")))
        if ex.claims is not None and self.attester is not None:
            if self.serving > 1:  # signed with the turn's other answers
                ex.attestation = await self.attester.attest(ex.claims)
            else:
                ex.attestation = self.attester.attest_alone(ex.claims)
            headers.append((b"x-grifo-attestation", ex.attestation.encode()))
        else:
            await self.catch_up()  # the turn's answers go out together
        headers.append(self.overhead(ex, answered_ns))
        return Response(response.status, payload, headers)

    def overhead(self, ex: Exchange, answered_ns: int) -> tuple[bytes, bytes]:
        """Time the gateway itself added: before dispatch, and after the point answered."""
        added_ns = (ex.dispatched_ns - ex.received_ns) + (time.monotonic_ns() - answered_ns)
        self.metrics.overhead.observe(added_ns / 1e9)
        return (b"x-grifo-overhead-ms", f"{added_ns / 1e6:.3f}".encode())

    def stream(
        self, ex: Exchange, response: UpstreamResponse, include_usage: bool
    ) -> StreamResponse:
        assert ex.point is not None
        answered_ns = time.monotonic_ns()
        point = ex.point
        ending = _StreamEnding(self, ex, response, include_usage)
        relay = ending.relay
        relay.prompt_tokens = relay.prompt_tokens or ex.prompt_estimate
        if ex.endpoint == AGENT_RUNS_PATH:
            relay.on_step = step_recorder(self.audit, self.metrics, ex, point)
        head_cost = cost_micros(point.price(ex.model), 0, relay.prompt_tokens, 0, 0)
        headers = _point_headers(point, head_cost)
        if ex.endpoint == AGENT_RUNS_PATH:  # a run's cost is known at its end only: usage event
            headers.pop()
        _request_headers(ex, headers)
        headers.append(self.overhead(ex, answered_ns))
        return StreamResponse(
            200, relay.body(), headers=headers, on_close=ending.on_close, pipe=relay.pipe
        )

    def meter(self, ex: Exchange, usage: Usage, status: str, source: str) -> int:
        """Bill, record and audit the request; the attestation's claims are left in
        `ex.claims`, for the caller to have signed with the other answers of its loop turn
        (`whole`, and a stream's last comment)."""
        point = ex.point
        assert point is not None
        busy_ns = self.leave_point(ex)
        point.answered += 1
        done_well = usage.completion_tokens if status == "ok" else None
        self.free_slot(ex, ok=status != "point_failed", completion_tokens=done_well)
        cost = cost_micros(
            point.price(ex.model),
            point.usd_per_hour_micros,
            usage.prompt_tokens,
            usage.completion_tokens,
            busy_ns,
            usage.cached_tokens,
        )
        self.ledger.record(
            LedgerEntry(  # positional, in column order: a third of the keywords' cost
                ex.request_id,
                int(time.time() * 1000),  # ts_ms
                ex.principal.tenant,
                ex.principal.key_id,
                ex.endpoint,
                ex.model,
                point.name,
                point.jurisdiction,
                usage.prompt_tokens,
                usage.completion_tokens,
                cost,
                status,
                source,
                (time.monotonic_ns() - ex.received_ns) / 1e6,  # latency_ms
            )
        )
        tokens = usage.prompt_tokens + usage.completion_tokens
        if ex.span is not None:
            metered(
                ex.span,
                point.name,
                point.jurisdiction,
                (usage.prompt_tokens, usage.completion_tokens),
                cost,
            )
        if ex.reservation is not None and self.budgets is not None:
            self.budgets.settle(ex.reservation, Amount(cost, tokens))
        if ex.lease is not None and self.limits is not None:
            self.limits.done(ex.lease, tokens)
        if self.audit is not None:
            record = self.audit.append(
                ex, point, (usage.prompt_tokens, usage.completion_tokens), status, cost
            )
            if self.config.audit.attest:
                ex.claims = self.audit.claims(record)
        self.metrics.meter(
            ex.principal.tenant,
            ex.principal.key_id,
            point.name,
            ex.model,
            (usage.prompt_tokens, usage.completion_tokens),
            cost,
            ex.endpoint,
        )
        return cost

    def free_slot(self, ex: Exchange, *, ok: bool, completion_tokens: int | None = None) -> None:
        """Give back the request's admission slot (once), with its time per output token when
        it completed well, so the point's concurrency limit learns from it."""
        if ex.slot is None or self.admission is None:
            return
        slot, ex.slot = ex.slot, None
        elapsed_s = (time.monotonic_ns() - ex.dispatched_ns) / 1e9
        sample = None
        if ok and completion_tokens is not None and ex.endpoint in _LEARNS_FROM:
            sample = elapsed_s / (completion_tokens + 1)
            self.admission.observe_time(elapsed_s)
        self.admission.leave(slot, sample_s=sample, ok=ok)

    def leave_point(self, ex: Exchange) -> int:
        """The request is done at its point: its share of the point's busy time (once)."""
        if ex.busy_share_ns is None:
            assert ex.point is not None
            ex.busy_share_ns = ex.point.busy.leave(ex.busy_mark, time.monotonic_ns())
        return ex.busy_share_ns

    def expire(self, ex: Exchange, response: UpstreamResponse) -> None:
        """The deadline passed while the point was still answering: stop reading, which closes
        the connection, and the point stops generating for nobody."""
        ex.deadline_hit = True
        response.fail(DeadlineExceededError(deadline_message(ex)))

    def release(self, ex: Exchange) -> None:
        """Nothing was produced: give back the reservation and the rate limits' tokens."""
        if ex.reservation is not None and self.budgets is not None:
            self.budgets.release(ex.reservation)
        if ex.lease is not None and self.limits is not None:
            self.limits.done(ex.lease, 0)


class _StreamEnding:
    """A stream's callbacks: from its relay (the point's outcome, metering once, the
    attestation, `[DONE]`) and from the client's connection (the stream closed).

    Methods of an object rather than closures in `Answering.stream`: compiled with mypyc
    (`make compiled`), closures and the environment they share refer to each other, and the
    collector would have to free every stream's objects. The relay holds these methods and this
    object holds the relay: `on_close` lets go of them (`StreamRelay.detach`)."""

    def __init__(
        self, answering: Answering, ex: Exchange, response: UpstreamResponse, include_usage: bool
    ) -> None:
        assert ex.point is not None
        self.answering = answering
        self.ex = ex
        self.point = ex.point
        self.done_early = False
        self.relay = StreamRelay(
            response, include_usage, self.meter, self.point_outcome, self.attestation
        )
        self.relay.on_end = self.at_done

    def point_outcome(self, ok: bool) -> None:
        if ok:
            self.point.succeeded()
        else:
            self.point.failed(time.monotonic(), self.answering.config.ejection)

    def meter(self, usage: Usage, status: str, source: str) -> int:
        ex = self.ex
        ex.point_receipt = self.relay.point_receipt  # the point sends it before its usage
        ex.first_token_ns = self.relay.first_output_ns or 0
        return self.answering.meter(ex, usage, status, source)

    async def attestation(self) -> str | None:
        """The stream's attestation, signed with the other answers of its loop turn."""
        ex, attester = self.ex, self.answering.attester
        if ex.claims is None or attester is None:
            return None
        ex.attestation = await attester.attest(ex.claims)
        return ex.attestation

    def at_done(self) -> None:
        """Off the point's in-flight count at `[DONE]` (a client may send its next request
        as soon as it reads it); its connection is in use until the stream closes."""
        self.done_early = True
        self.point.left()
        self.point.closing_streams += 1

    async def on_close(self, completed: bool) -> None:
        ex, relay, point = self.ex, self.relay, self.point
        ex.cancel_deadline()
        relay.detach()
        if self.done_early:
            point.closing_streams -= 1
        else:
            point.left()
        if relay.cost is None:  # the usage event never came: bill what was produced
            # A client may close as soon as it reads `[DONE]`, before the point's end.
            status = "ok" if completed or relay.ended else "client_closed"
            status = "point_failed" if relay.broken else status
            status = "deadline_exceeded" if ex.deadline_hit else status
            ex.first_token_ns = relay.first_output_ns or 0
            # The stream is over: no one is left to hand an attestation to, so none is
            # signed (its claims stay unused).
            self.answering.meter(ex, relay.usage_so_far(), status, "estimated")
        latency_s = (time.monotonic_ns() - ex.received_ns) / 1e9
        first = relay.first_event_ns
        ttft_s = None if first is None else (first - ex.received_ns) / 1e9
        code = 200 if completed else 499
        produced = relay.usage_so_far().completion_tokens
        self.answering.metrics.observe(
            ex.endpoint, point.name, ex.model, code, (latency_s, ttft_s), produced
        )


def _point_headers(point: PointState, cost: int) -> Headers:
    """Where it ran, and (last) what it cost."""
    return [*point.headers, (b"x-grifo-cost-micros", str(cost).encode())]


def deadline_message(ex: Exchange) -> str:
    return f"the request's deadline of {ex.timeout_s * 1000:.0f} ms passed (x-grifo-timeout-ms)"


def _request_headers(ex: Exchange, headers: Headers) -> None:
    """What happened to the request on its way: redaction, guardrail scores, earlier tries."""
    if ex.redacted:
        headers.append((b"x-grifo-redacted", ex.redacted.encode()))
    if ex.verdict is not None and ex.verdict.injection_rules:
        rules = ",".join(ex.verdict.injection_rules)
        value = f"{ex.verdict.injection_score:.2f}; rules={rules}"
        headers.append((b"x-grifo-injection-score", value.encode()))
    if ex.tried:
        headers.append((b"x-grifo-tried", _tried(ex.tried)))


def _tried(tried: list[tuple[PointState, str]]) -> bytes:
    return ",".join(f"{point.name}:{outcome}" for point, outcome in tried).encode()
