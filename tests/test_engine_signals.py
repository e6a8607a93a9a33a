"""Engines' own load signals: vLLM's and llama.cpp's `/metrics`, llama-server's `/slots` and
`/props`, read by a proxy point, and placement moving away from the engine with the longer queue
or the fuller KV cache. Where each sample comes from: tests/data/engine_metrics/SOURCES.md."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from grifo.http.client import ConnectionPool
from grifo.http.message import Request, Response
from grifo.point.app import PointIdentity
from grifo.point.llama_server import (
    MAX_BODY,
    ServerProps,
    SlotSignals,
    parse_props,
    parse_slots,
)
from grifo.point.proxy import ProxyPointApp, compose_load
from grifo.point.signals import EngineSignals, parse
from tests.support.fabric import CHAT, Fabric
from tests.support.threaded import ThreadedServer

SAMPLES = Path(__file__).parent / "data" / "engine_metrics"


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("vllm-v1.txt", EngineSignals("vllm", 7, 12, 0.8125, 0.25)),
        ("vllm-v0.txt", EngineSignals("vllm", 3, 0, 0.05, 0.42)),
        ("llama-server.txt", EngineSignals("llama.cpp", 2, 5, 0.25, None)),
    ],
)
def test_engine_metrics_are_read_in_each_engines_naming(
    sample: str, expected: EngineSignals
) -> None:
    assert parse((SAMPLES / sample).read_text()) == expected


@pytest.mark.parametrize(
    "text", ["", "# TYPE other gauge\nother 1\n", "not prometheus at all {{{", "vllm:x{ 1"]
)
def test_anything_else_is_no_signal(text: str) -> None:
    assert parse(text) is None


def test_metrics_without_a_cache_gauge_leave_it_unknown_and_odd_values_count_as_zero() -> None:
    text = (
        "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing NaN\n"
        "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred +Inf\n"
    )
    assert parse(text) == EngineSignals("llama.cpp", 0, 0, None, None)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        # the README's two slots, both processing; no cached-token counts in that build
        ("llama-server-slots.json", SlotSignals(2, 2, None)),
        # 4 x 4096 context; 1024 + 2048 (idle, still cached) + 0 + 1024 tokens held
        ("llama-server-slots-cached.json", SlotSignals(4, 2, 0.25)),
        ("llama-server-slots-legacy.json", SlotSignals(1, 1, None)),  # `state`: 1
    ],
)
def test_llama_server_slots_give_busy_slots_capacity_and_cache_use(
    sample: str, expected: SlotSignals
) -> None:
    assert parse_slots((SAMPLES / sample).read_bytes()) == expected


def test_llama_server_props_give_slots_context_and_model() -> None:
    props = parse_props((SAMPLES / "llama-server-props.json").read_bytes())
    assert props == ServerProps(1, 1024, "../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{}",
        b"null",
        b'{"error": {"code": 501, "message": "This server does not support slots endpoint.",'
        b' "type": "not_supported_error"}}',
        b"[]",
        b'[1, "x", null, [], {"id": 0}]',
        b'[{"is_processing": "yes", "state": "1"}]',
        b"[" * 100_000 + b"]" * 100_000,
        b"[" + b'{"is_processing": false},' * (MAX_BODY // 20) + b"{}]",
    ],
)
def test_anything_else_is_no_slot_signal(body: bytes) -> None:
    assert parse_slots(body) is None


def test_slot_fields_of_the_wrong_type_are_ignored_one_by_one() -> None:
    slots = [
        {"is_processing": True, "n_ctx": "4096", "n_prompt_tokens": 10},  # n_ctx: a string
        {"is_processing": True, "n_ctx": 100, "n_prompt_tokens": True},  # a bool, not a count
        {"is_processing": False, "n_ctx": 100, "n_prompt_tokens": 1000},  # more than n_ctx
        {"is_processing": 1, "state": 0, "n_ctx": -5},  # `state` decides; n_ctx ignored
        {"state": 2.5},  # neither
    ]
    assert parse_slots(json.dumps(slots).encode()) == SlotSignals(4, 2, 100 / 200)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"total_slots": 4}', ServerProps(4, None, None)),
        (
            b'{"total_slots": 0, "default_generation_settings": {"n_ctx": 8192}}',
            ServerProps(None, 8192, None),
        ),
        (b'{"total_slots": true, "default_generation_settings": [], "model_path": 7}', None),
        (b'{"total_slots": 2.0, "model_path": "m.gguf"}', ServerProps(None, None, "m.gguf")),
        (b"[1, 2]", None),
        (b"{", None),
    ],
)
def test_props_are_read_field_by_field(body: bytes, expected: ServerProps | None) -> None:
    assert parse_props(body) == expected


def test_load_takes_the_best_source_there_is() -> None:
    metrics = EngineSignals("llama.cpp", 3, 2, None, None)
    slots = SlotSignals(4, 3, 0.5)
    props = ServerProps(4, 4096, None)
    assert compose_load(metrics, slots, None, 9) == {
        "in_flight": 3,
        "queued": 2,
        "prefix_hit_rate": None,
        "engine": "llama.cpp",
        "cache_usage": 0.5,
        "capacity": 4,
        "sources": ["metrics", "slots"],
    }
    # no /metrics: busy slots are in flight, this point's requests beyond the slots queue
    assert compose_load(None, slots, None, 6) == {
        "in_flight": 3,
        "queued": 2,
        "engine": "llama.cpp",
        "cache_usage": 0.5,
        "capacity": 4,
        "sources": ["slots"],
    }
    assert compose_load(None, None, props, 5) == {
        "in_flight": 4,
        "queued": 1,
        "engine": "llama.cpp",
        "capacity": 4,
        "sources": ["props"],
    }
    unknown = {"in_flight": 2, "queued": 0, "engine": "unknown", "sources": []}
    assert compose_load(None, None, None, 2) == unknown


class LlamaServer:
    """llama.cpp's `llama-server` without `--metrics`: `/slots` and `/props` from the samples,
    each of which the test can turn off (501, as llama-server answers a disabled endpoint)."""

    def __init__(self) -> None:
        self.slots: bytes | None = (SAMPLES / "llama-server-slots-cached.json").read_bytes()
        self.props: bytes | None = (SAMPLES / "llama-server-props.json").read_bytes()
        self.asked: list[str] = []
        self._server = ThreadedServer(self.handle)

    async def handle(self, request: Request) -> Response:
        self.asked.append(request.path)
        if request.path == "/slots" and self.slots is not None:
            return Response(200, self.slots)
        if request.path == "/props" and self.props is not None:
            return Response(200, self.props)
        if request.path in ("/slots", "/metrics"):
            error = {"code": 501, "message": "not supported", "type": "not_supported_error"}
            return Response(501, msgspec.json.encode({"error": error}))
        return Response(404, b'{"error": {"code": 404, "message": "File Not Found"}}')

    def loads(self, times: int = 1) -> list[dict[str, object]]:
        """`/load` of a fresh proxy point in front of this server, asked `times` times."""

        async def ask() -> list[dict[str, object]]:
            identity = PointIdentity("edge", "lima", "r", "PE", "edge")
            point = ProxyPointApp(identity, ConnectionPool("127.0.0.1", self._server.port))
            answers = []
            try:
                for _ in range(times):
                    response = await point.handle(Request("GET", "/load", "", {}, b""))
                    assert isinstance(response, Response)
                    answers.append(dict(json.loads(response.body)))
            finally:
                await point.upstream.close()
            return answers

        return asyncio.run(ask())

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def llama_server() -> Iterator[LlamaServer]:
    server = LlamaServer()
    yield server
    server.close()


def test_a_proxy_point_reads_llama_servers_slots_then_props(llama_server: LlamaServer) -> None:
    assert llama_server.loads()[0] == {
        "in_flight": 2,
        "queued": 0,
        "engine": "llama.cpp",
        "cache_usage": 0.25,
        "capacity": 4,
        "sources": ["slots"],
    }
    assert llama_server.asked == ["/metrics", "/slots"]
    llama_server.slots = None  # --no-slots
    assert llama_server.loads()[0] == {
        "in_flight": 0,
        "queued": 0,
        "engine": "llama.cpp",
        "capacity": 1,
        "sources": ["props"],
    }
    llama_server.props = b'{"total_slots": "many"}'  # nothing usable left
    assert llama_server.loads()[0] == {
        "in_flight": 0,
        "queued": 0,
        "engine": "unknown",
        "sources": [],
    }


def test_endpoints_an_upstream_lacks_are_not_asked_again_at_once(
    llama_server: LlamaServer,
) -> None:
    llama_server.slots = None
    first, second = llama_server.loads(2)
    assert first == second
    # /metrics and /slots answered 501 once; /props is kept a minute
    assert llama_server.asked == ["/metrics", "/slots", "/props"]


class Engine:
    """An OpenAI-compatible engine with vLLM's /metrics, whose load the test sets."""

    def __init__(self) -> None:
        self.waiting, self.running, self.cache = 0, 0, 0.0
        self.served = 0
        self._server = ThreadedServer(self.handle)
        self.port = self._server.port

    async def handle(self, request: Request) -> Response:
        if request.path == "/v1/models":
            models = {"data": [{"id": CHAT, "max_model_len": 2048}]}
            return Response(200, msgspec.json.encode(models))
        if request.path == "/metrics":
            label = f'{{engine="0",model_name="{CHAT}"}}'
            text = (
                f"# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{label} {self.running}\n"
                f"# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{label} {self.waiting}\n"
                f"# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{label} {self.cache}\n"
            )
            return Response(200, text.encode(), content_type=b"text/plain")
        self.served += 1
        answer = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": CHAT,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
        return Response(200, msgspec.json.encode(answer))

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def engines() -> Iterator[tuple[Engine, Engine]]:
    pair = (Engine(), Engine())
    yield pair
    for engine in pair:
        engine.close()


def test_placement_follows_the_engines_queues_and_caches(
    engines: tuple[Engine, Engine], tmp_path: Path
) -> None:
    a, b = engines
    points = "\n".join(
        f"  - {{name: {name}, site: lima, region: r, jurisdiction: PE, tier: edge, rtt_ms: 5,"
        f' engine: {{kind: proxy, upstream_url: "http://127.0.0.1:{engine.port}"}}}}'
        for name, engine in (("vllm-a", a), ("vllm-b", b))
    )
    topology = (
        "gateway: {demo_keys: true, health_interval_s: 0.1}\n"
        f"points:\n{points}\ntenants:\n  - {{name: demo-peru}}\n"
    )
    b.waiting, b.running, b.cache = 20, 8, 0.5  # b's queue is long
    fab = Fabric.from_yaml(topology, tmp_path)
    try:
        client = fab.client("demo-peru")

        def served_by() -> str:
            raw = client.chat.completions.with_raw_response.create(
                model=CHAT, messages=[{"role": "user", "content": "where?"}]
            )
            return str(raw.headers["x-grifo-point"])

        states = {p.name: p for p in fab.running.gateway.points}
        deadline = time.monotonic() + 5
        while states["vllm-b"].queued != 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states["vllm-b"].queued == 20
        assert states["vllm-b"].point_in_flight == 8
        assert {served_by() for _ in range(5)} == {"vllm-a"}
        # Now only a's KV cache is nearly full: no queue anywhere, and a would win a tie by
        # name, so b being chosen is the cache pressure's doing.
        b.waiting, b.running, b.cache = 0, 0, 0.0
        a.cache = 0.97
        while states["vllm-a"].cache_usage < 0.9 and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        while states["vllm-b"].queued and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert {served_by() for _ in range(5)} == {"vllm-b"}
        assert a.served == 5
        assert b.served == 5
    finally:
        fab.close()
