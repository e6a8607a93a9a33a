"""The configuration schema (msgspec structs). Prices are written in USD and held in micro-USD."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from grifo.config.base import Base, Name, Tier, Usd
from grifo.config.ray import RayConfig
from grifo.config.registry import RegistryConfig
from grifo.config.tools import ToolsConfig


class ModelPrice(Base, kw_only=True, frozen=True):
    input_usd_per_1m: Usd = 0.0
    output_usd_per_1m: Usd = 0.0
    cached_input_usd_per_1m: Usd | None = None
    """Prompt tokens the engine reused from its prefix cache (default: `input_usd_per_1m`)."""


class Prices(Base, kw_only=True, frozen=True):
    usd_per_hour: Usd = 0.0
    default: ModelPrice = ModelPrice()
    models: dict[str, ModelPrice] = {}


class EngineConfig(Base, kw_only=True, frozen=True):
    """A local engine that `grifo serve` starts as a point process."""

    kind: Literal["llama_cpp", "fake", "proxy"] = "llama_cpp"
    model: str = "smollm2"
    model_id: str | None = None
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] | Literal["auto"] = "auto"
    """llama_cpp: threads per engine; `auto`: the count that decodes fastest on this host,
    measured at the point's first start and remembered (engines/threads.py)."""
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """llama_cpp: sequences decoded together (continuous batching); each gets context_length."""
    gpu_layers: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | Literal["all"] = 0
    """llama_cpp: model layers offloaded to the GPU (`all`: every one); needs llama-cpp-python
    built with a GPU backend (`CMAKE_ARGS=-DGGML_CUDA=on`). The point refuses to start when the
    build has none rather than run on the CPU at a fraction of the speed asked for."""
    quantization: Literal["as-is", "q4_0", "q8_0"] = "as-is"
    """llama_cpp: convert the model once (cached in $GRIFO_CACHE_DIR or ~/.cache/grifo)."""
    prefix_cache: bool = True
    """llama_cpp: a request reuses the KV cache of a finished one sharing its prompt's prefix
    (a conversation's earlier turns, an agent's steps, a common system prompt)."""
    context_length: Annotated[int, msgspec.Meta(ge=64, le=1_048_576)] = 2048
    embeddings: Literal["minilm", "fake", "none"] = "minilm"
    upstream_url: str | None = None
    token_delay_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 0.0
    """fake engine only: time per generated token, to exercise streaming and cancellation."""
    ray: RayConfig | None = None  # the engine on Ray Serve; the point keeps its HTTP surface


class TlsConfig(Base, kw_only=True, frozen=True):
    """A TLS listener: its certificate and key (PEM); with `client_ca_file`, clients must show a
    certificate signed by that CA (mutual TLS). `grifo certs` makes a local CA and certificates."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class PointTlsConfig(Base, kw_only=True, frozen=True):
    """How the gateway talks to `https://` points: the CA their certificates are checked
    against (default: the system's) and the gateway's own certificate for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class PointConfig(Base, kw_only=True, frozen=True):
    name: Name
    site: str
    region: str
    jurisdiction: str
    tier: Tier
    rtt_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] = 0.0
    url: str | None = None
    engine: EngineConfig | None = None
    prices: Prices = Prices()
    tls: TlsConfig | None = None
    """The point's listener over TLS (a point grifo starts is then reached at https://)."""
    tools: ToolsConfig = ToolsConfig()


class BudgetConfig(Base, kw_only=True, frozen=True):
    """Spending limit over a UTC calendar period.

    strict: a request is admitted only if its worst-case cost still fits (never exceeded);
    soft: admitted while spending is under the limit (overspend at most one request's worst case).
    """

    usd: Usd | None = None
    tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Prompt plus completion tokens; a budget limits micro-USD, tokens, or both."""
    period: Literal["day", "month"] = "month"
    mode: Literal["strict", "soft"] = "strict"


class LimitsConfig(Base, kw_only=True, frozen=True):
    """Rate limits of a tenant or key (each unset means unlimited). Tokens are prompt plus
    completion: reserved from `max_tokens` when a request starts, corrected to the real count
    when it ends."""

    requests_per_min: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tokens_per_min: Annotated[int, msgspec.Meta(ge=1)] | None = None
    concurrent: Annotated[int, msgspec.Meta(ge=1)] | None = None


class GuardrailsConfig(Base, kw_only=True, frozen=True):
    """A tenant's guardrails on request input (see README, Guardrails)."""

    pii: Literal["allow", "redact", "block"] = "allow"
    """Personal data (e-mails, phones, cards, IBANs, CPF, DNI): pass, replace by its kind
    before the request leaves the gateway, or refuse the request (400 `pii_blocked`)."""
    injection: Literal["allow", "flag", "block"] = "allow"
    """Prompt-injection heuristics on user and tool messages: ignore, report the score
    (`x-grifo-injection-score`), or refuse at `injection_threshold` (400 `prompt_injection`)."""
    injection_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    tool_injection: Literal["flag", "block"] = "block"
    """Tool outputs in agent runs (third-party text): report the injection score, or also
    withhold an output scoring at `injection_threshold` from the model."""


class TenantConfig(Base, kw_only=True, frozen=True):
    name: Name
    allowed_jurisdictions: list[str] | None = None
    """None means unrestricted; an empty list allows nothing."""
    tier: Literal["edge", "regional", "central", "any"] = "any"
    """Default tier for the tenant's requests; `x-grifo-tier` overrides it per request."""
    budget: BudgetConfig | None = None
    timeout_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Default deadline for the tenant's requests (`x-grifo-timeout-ms` overrides it)."""
    limits: LimitsConfig | None = None
    guardrails: GuardrailsConfig = GuardrailsConfig()
    priority: Literal["low", "normal", "high"] = "normal"
    """Its requests' priority when points are saturated; `x-grifo-priority` may lower it."""
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    """Its share of saturated points against other tenants of the same priority."""
    data_classes: dict[Name, list[str] | None] = {}
    """Jurisdictions per data class, e.g. `{personal: [EU], health: [DE], public: null}` (null:
    unrestricted). A request names its class in `x-grifo-data-class`; without one it gets
    `default_data_class`, or `allowed_jurisdictions` when that is unset too."""
    default_data_class: Name | None = None
    redacted_to: dict[Name, list[str]] = {}
    """Per data class, jurisdictions it may also go to once personal data is redacted from it
    (e-mails, phone numbers, cards, IBANs, CPF, DNI: see guardrails/pii.py)."""


class KeyConfig(Base, kw_only=True, frozen=True):
    tenant: Name
    id: Name
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")] | None = None
    env: str | None = None
    budget: BudgetConfig | None = None
    limits: LimitsConfig | None = None
    expires: str | None = None
    """ISO 8601 date or time (UTC unless it says otherwise) after which the key is refused."""
    models: list[str] | None = None
    """The only models this key may use (None: all its tenant's)."""
    role: Literal["user", "tenant-admin", "auditor", "admin"] = "user"
    """user: inference; tenant-admin: inference and its tenant's /admin reads; auditor: its
    tenant's /admin reads only; admin: every tenant's /admin reads."""


class PlacementConfig(Base, kw_only=True, frozen=True):
    """How candidates are scored: expected latency in ms plus price converted to ms."""

    ms_per_micro_usd: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    queue_ms_per_request: Annotated[float, msgspec.Meta(ge=0)] = 250.0
    cache_ms_at_full: Annotated[float, msgspec.Meta(ge=0)] = 1000.0
    """KV-cache pressure: ms added in proportion to the share of a point's engine cache in use
    (vLLM, llama.cpp's server report it), the whole of it when the cache is full."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=16)] = 3
    """How many compliant points a request may be tried on before the first byte."""
    affinity_slack_ms: Annotated[float, msgspec.Meta(ge=0)] = 500.0
    """A session (`x-grifo-session-id`, an agent run's `session_id`) stays on its point while
    that point scores at most this much worse than the best (see placement/affinity.py)."""
    prefix_affinity_chars: Annotated[int, msgspec.Meta(ge=0)] = 1024
    """A chat without a session whose opening (system and developer messages, and the start
    of the first user message) is at least this long is a session keyed by that opening;
    a completion by its prompt's first this many characters (0: off)."""


class EjectionConfig(Base, kw_only=True, frozen=True):
    """Passive outlier detection (Envoy's defaults): after `consecutive_failures` failed answers
    in a row a point is taken out for base_s × times ejected, at most max_s."""

    consecutive_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    base_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    latency_factor: Annotated[float, msgspec.Meta(gt=1)] | None = None
    """A point answering this many times slower per output token than the median of its peers
    (the points of its tier serving the same models, at least 3 with recent traffic) is ejected
    too. Off by default: peers on different hardware are legitimately slower."""


class DispatchConfig(Base, kw_only=True, frozen=True):
    """Retries and hedges. Until the client has received a byte (a whole answer read, or a
    stream's first token) a failed attempt is tried again on the next ranked point of the
    request's allowed set; after that, failures travel in-band. See README, Resilience."""

    try_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """One attempt's time to answer (a stream's first token, or a whole answer); a point that
    misses it is counted as failing and the request moves on. None: the request's deadline."""
    retry_ratio: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.2
    retry_min: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 3
    """Envoy's retry budget: retries and hedges in progress stay under
    max(retry_min, retry_ratio × requests being dispatched)."""
    hedge_tiers: list[Literal["edge", "regional", "central", "any"]] = []
    """Requests for these tiers (`x-grifo-tier` or the tenant's) are hedged: when the first
    point has not answered after its observed p95, a copy goes to the next compliant point."""
    hedge_quantile: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.95
    hedge_min_delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    hedge_initial_delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 500.0
    """The hedge delay until a point has 20 observations of its own."""


class AdmissionConfig(Base, kw_only=True, frozen=True):
    """Concurrency limits per point learned from latency, a priority queue, and shedding (see
    README, Resilience, and admission/shedding.py for the rule)."""

    enabled: bool = True
    initial_limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    min_limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2
    max_limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 4096
    tolerance: Annotated[float, msgspec.Meta(ge=1, le=10)] = 1.5
    """How much slower than its long-term average a point may answer before its limit shrinks."""
    max_queue: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1024
    max_wait_ms: Annotated[int, msgspec.Meta(ge=0)] = 10_000


class JwtConfig(Base, kw_only=True, frozen=True):
    """OIDC/JWT bearer tokens besides API keys (see README, Identity): verified against the
    keys of a JWKS file, mapped to a tenant and a role by two claims."""

    jwks_file: str
    issuer: str
    audience: str
    algorithms: tuple[
        Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"], ...
    ] = (
        "RS256",
        "ES256",
        "EdDSA",
    )
    tenant_claim: str = "tenant"
    role_claim: str = "role"
    leeway_s: Annotated[int, msgspec.Meta(ge=0, le=300)] = 30


class TracingConfig(Base, kw_only=True, frozen=True):
    """OpenTelemetry traces of requests (see README, Observability); off by default."""

    enabled: bool = False
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces (default: the
    OTEL_EXPORTER_OTLP_* environment, else localhost:4318)."""
    service_name: str = "grifo-gateway"
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    """Share of new traces recorded; a client's sampled `traceparent` is always followed."""


class AuditConfig(Base, kw_only=True, frozen=True):
    """The audit log: one chained, signed record per metered request (see README, Audit)."""

    enabled: bool = True
    name: Name | None = None
    """This gateway in the audit log and its signatures (default: the host name); its logs
    are `<name>/<worker>`."""
    key_file: str | None = None
    """Ed25519 signing key (PEM); default `<state-dir>/audit-signing.pem`, created once."""
    hmac_key_env: str | None = None
    """A variable holding the secret that tenants' content HMAC keys derive from; default a
    random secret kept in `<state-dir>/audit-hmac.key`. Replicas must share it."""
    checkpoint_every: Annotated[int, msgspec.Meta(ge=1)] = 1000
    checkpoint_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    attest: bool = True
    """Sign `x-grifo-attestation` on every whole response."""
    retention_days: Annotated[int, msgspec.Meta(ge=183)] = 183
    """Records older than this keep only their hashes (content pruned daily; EU AI Act Art. 19
    and 26(6) ask for at least six months)."""


OutagePolicy = Literal["auto", "fail-closed", "fail-open"]


class StoreConfig(Base, kw_only=True, frozen=True):
    """Where state lives. Unset: SQLite in the state directory (one host, any number of
    workers). Gateway replicas on several hosts share PostgreSQL (keys, ledger, idempotency
    keys) and Redis (budget reservations)."""

    postgres_url: str | None = None
    """e.g. `postgresql://grifo@db.internal:5432/grifo`; `postgres_url_env` names a variable
    holding it instead (for URLs with a password)."""
    postgres_url_env: str | None = None
    postgres_schema: Name = "grifo"
    redis_url: str | None = None
    """e.g. `redis://cache.internal:6379/0`; or `redis_url_env`."""
    redis_url_env: str | None = None
    redis_prefix: Name = "grifo"
    budget_outage: OutagePolicy = "auto"
    """Redis unreachable: refuse budgeted requests (`fail-closed`, 503), admit them unchecked
    (`fail-open`), or `auto`: closed for strict budgets, open for soft ones."""
    budget_lease_requests: Annotated[int, msgspec.Meta(ge=0)] = 256
    """Worst cases leased at once from a budget (README, Replicas); 0: a call per request."""


class GatewayConfig(Base, kw_only=True, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 1024 * 1024
    health_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    demo_keys: bool = False
    placement: PlacementConfig = PlacementConfig()
    ejection: EjectionConfig = EjectionConfig()
    dispatch: DispatchConfig = DispatchConfig()
    admission: AdmissionConfig = AdmissionConfig()
    tracing: TracingConfig = TracingConfig()
    tls: TlsConfig | None = None
    """Serve clients over HTTPS (see README, TLS)."""
    jwt: JwtConfig | None = None
    point_tls: PointTlsConfig | None = None
    store: StoreConfig = StoreConfig()
    audit: AuditConfig = AuditConfig()
    registry: RegistryConfig | None = None
    """Points that register themselves with join tokens (see README, Points join and leave)."""


class GrifoConfig(Base, kw_only=True, frozen=True):
    points: list[PointConfig]
    gateway: GatewayConfig = GatewayConfig()
    blocs: dict[str, list[str]] = {}
    tenants: list[TenantConfig] = []
    keys: list[KeyConfig] = []
