"""Gateway Prometheus metrics. What requests update is a `series` counter or histogram (an
addition per update, turned into Prometheus families when scraped); gauges, set rarely, are
`prometheus_client`'s."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from grifo.telemetry.series import Counter, CounterChild, Histogram, HistogramChild

_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/grifo/agent-runs": "invoke_agent",
}
# Label sets whose series are cached together; past this many, new ones are looked up each time.
_MAX_CACHED = 4096
_Metered = tuple[HistogramChild, HistogramChild, CounterChild, CounterChild, CounterChild]


class _Answered:
    """The series of one answered request's label set. Time to first token and per output
    token get a series once first observed (an empty one would show in the exposition)."""

    __slots__ = ("_tpot", "_ttft", "histograms", "labels", "latency", "requests")

    def __init__(
        self,
        requests: CounterChild,
        histograms: tuple[Histogram, Histogram, Histogram] | None,  # latency, ttft, tpot
        labels: tuple[str, str, str],
    ) -> None:
        self.requests = requests
        self.histograms = histograms  # None: the request reached no point, counted only
        self.labels = labels
        self.latency = None if histograms is None else histograms[0].labels(*labels)
        self._ttft: HistogramChild | None = None
        self._tpot: HistogramChild | None = None

    def ttft(self) -> HistogramChild:
        if self._ttft is None:
            assert self.histograms is not None
            self._ttft = self.histograms[1].labels(*self.labels)
        return self._ttft

    def tpot(self) -> HistogramChild:
        if self._tpot is None:
            assert self.histograms is not None
            self._tpot = self.histograms[2].labels(*self.labels)
        return self._tpot


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "grifo_requests", "Requests answered", ["endpoint", "point", "status"], registry=r
        )
        self.tokens = Counter(
            "grifo_tokens", "Tokens metered", ["point", "model", "kind"], registry=r
        )
        self.cost = Counter(
            "grifo_cost_micros",
            "Cost metered, micro-USD (resets with the process: bill from the ledger)",
            ["tenant", "key", "point", "model"],
            registry=r,
        )
        # The OpenTelemetry GenAI semantic conventions' metrics, in Prometheus naming.
        labels = ["gen_ai_operation_name", "gen_ai_request_model", "point"]
        self.latency = Histogram(
            "gen_ai_server_request_duration_seconds",
            "gen_ai.server.request.duration: request received to last byte",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "gen_ai.server.time_to_first_token: request received to first token (streams)",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "gen_ai.server.time_per_output_token: time per output token after the first "
            "(streams), or per output token (whole answers)",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "gen_ai.client.token.usage: tokens per request, by type (input, output)",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
            registry=r,
        )
        self.overhead = Histogram(
            "grifo_gateway_overhead_seconds",
            "Time the gateway adds to a request: before dispatch and after the point's answer",
            buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            registry=r,
        )
        self.budget = Gauge(
            "grifo_budget_micros",
            "Tenant budgets: limit, spent this period, and spent projected to the period end "
            "at the last hour's rate",
            ["tenant", "kind"],
            registry=r,
        )
        self.budget_exhaustion = Gauge(
            "grifo_budget_exhaustion_timestamp_seconds",
            "When a tenant's budget runs out at the last hour's rate (0: not this period)",
            ["tenant"],
            registry=r,
        )
        self.point_up = Gauge("grifo_point_up", "1 if the point is healthy", ["point"], registry=r)
        self.placements = Counter(
            "grifo_placement_decisions",
            "Requests placed, by why their point: best_score (of several compliant candidates), "
            "only_compliant, retried (earlier points failed), hedged (a copy raced)",
            ["reason"],
            registry=r,
        )
        self.agent_steps = Counter(
            "grifo_agent_steps",
            "Steps of agent runs, by point and kind: model, tool (a result), tool_error",
            ["point", "kind"],
            registry=r,
        )
        self.denials = Counter(
            "grifo_jurisdiction_denials", "Requests refused: no compliant point", registry=r
        )
        self.store_up = Gauge(
            "grifo_store_up",
            "1 if the store answered its last use: `ledger` (the ledger database), `audit` "
            "(the audit log's records and checkpoints) or `budgets` (where reservations are "
            "counted)",
            ["store"],
            registry=r,
        )
        self.spool_backlog = Gauge(
            "grifo_ledger_spool_backlog_segments",
            "Spool segments holding ledger entries that wait for the database",
            registry=r,
        )
        self.audit_spool_backlog = Gauge(
            "grifo_audit_spool_backlog_segments",
            "Spool segments holding audit records or checkpoints that wait for the database",
            registry=r,
        )
        self.audit_records = Counter(
            "grifo_audit_records",
            "Audit records appended: one per request, and one per agent step",
            registry=r,
        )
        self.attestations = Counter(
            "grifo_attestations",
            "Answers given a signed x-grifo-attestation (whole answers, and streams at their end)",
            registry=r,
        )
        self.attestation_signatures = Counter(
            "grifo_attestation_signatures",
            "Ed25519 signatures made for attestations: the answers of one event-loop turn share "
            "one (grifo_attestations_total over this is the answers per signature)",
            registry=r,
        )
        self.unchecked = Counter(
            "grifo_budget_unchecked",
            "Requests admitted without a budget reservation because the budget store was down "
            "(budget_outage: fail-open)",
            registry=r,
        )
        self.limits_unchecked = Counter(
            "grifo_ratelimit_unchecked",
            "Requests admitted without a rate-limit check because Redis was down",
            registry=r,
        )
        self.leased = Counter(
            "grifo_budget_leased",
            "Budget reservations taken from this gateway's lease of a shared budget, without "
            "a call to Redis",
            registry=r,
        )
        self._seen: dict[str, int] = {}
        # The series one answer updates, found once per label set (one lookup, not five).
        self._answered: dict[tuple[str, str, str, int], _Answered] = {}
        self._metered: dict[tuple[str, str, str, str, str], _Metered] = {}
        self._placed: dict[str, CounterChild] = {}  # by reason: a handful

    def catch_up(self, counter: Counter, total: int) -> None:
        """Bring `counter` up to `total` (a running count kept by its owner)."""
        seen = self._seen.get(counter.name, 0)
        if total > seen:
            counter.inc(total - seen)
            self._seen[counter.name] = total

    def observe(
        self,
        endpoint: str,
        point: str,
        model: str,
        status: int,
        times: tuple[float, float | None],
        output_tokens: int,
    ) -> None:
        """An answered request: `times` is (latency, time to first token) in seconds."""
        latency_s, ttft_s = times
        answered = self._answered.get((endpoint, point, model, status))
        if answered is None:
            answered = self._answered_series(endpoint, point, model, status)
        answered.requests.inc()
        if answered.latency is None:  # no point: counted, not timed
            return
        answered.latency.observe(latency_s)
        if ttft_s is not None:
            answered.ttft().observe(ttft_s)
            if output_tokens > 1:
                answered.tpot().observe((latency_s - ttft_s) / (output_tokens - 1))
        elif output_tokens > 0:
            answered.tpot().observe(latency_s / output_tokens)

    def _answered_series(self, endpoint: str, point: str, model: str, status: int) -> _Answered:
        answered = _Answered(
            self.requests.labels(endpoint, point, str(status)),
            (self.latency, self.ttft, self.tpot) if point else None,
            (_OPERATIONS.get(endpoint, "chat"), model, point),
        )
        if len(self._answered) < _MAX_CACHED:
            self._answered[(endpoint, point, model, status)] = answered
        return answered

    def meter(
        self,
        tenant: str,
        key: str,
        point: str,
        model: str,
        usage: tuple[int, int],
        cost: int,
        endpoint: str = "/v1/chat/completions",
    ) -> None:
        prompt, completion = usage
        metered = self._metered.get((tenant, key, point, model, endpoint))
        if metered is None:
            metered = self._metered_series(tenant, key, point, model, endpoint)
        input_tokens, output_tokens, prompt_tokens, completion_tokens, costs = metered
        input_tokens.observe(prompt)
        output_tokens.observe(completion)
        prompt_tokens.inc(prompt)
        completion_tokens.inc(completion)
        costs.inc(cost)

    def _metered_series(
        self, tenant: str, key: str, point: str, model: str, endpoint: str
    ) -> _Metered:
        operation = _OPERATIONS.get(endpoint, "chat")
        metered = (
            self.token_usage.labels(operation, model, "input"),
            self.token_usage.labels(operation, model, "output"),
            self.tokens.labels(point, model, "prompt"),
            self.tokens.labels(point, model, "completion"),
            self.cost.labels(tenant, key, point, model),
        )
        if len(self._metered) < _MAX_CACHED:
            self._metered[(tenant, key, point, model, endpoint)] = metered
        return metered

    def placed(self, reason: str) -> None:
        child = self._placed.get(reason)
        if child is None:
            child = self._placed[reason] = self.placements.labels(reason)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
