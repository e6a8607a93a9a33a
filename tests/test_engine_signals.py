"""Engines' own load signals: vLLM's and llama.cpp's `/metrics` read by a proxy point, and
placement moving away from the engine with the longer queue or the fuller KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from grifo.http.message import Request, Response
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
