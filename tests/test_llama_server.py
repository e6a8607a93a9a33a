"""A real llama.cpp engine behind a proxy point: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`, the `llama-server` extra) serving SmolLM2, in front of which a
grifo point runs with `engine: {kind: proxy}`; requests go through the gateway."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from openai.types.chat import ChatCompletionMessageParam

from grifo.point.engines.llama import resolve_model
from tests.support.fabric import Fabric

pytestmark = pytest.mark.engine

MODEL = "smollm2-135m-instruct"
_SERVER_DEPS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama_cpp.server on a free port, once it answers `/v1/models` (at most 30 s)."""
    missing = [m for m in _SERVER_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama_cpp.server needs {missing}: pip install -e '.[llama-server]'")
    model_path, _ = resolve_model("smollm2")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        *(sys.executable, "-m", "llama_cpp.server", "--model", str(model_path)),
        *("--model_alias", MODEL, "--n_ctx", "512", "--n_threads", "2"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get_json(f"{url}/v1/models")
                break
            except OSError:
                exited = proc.poll()
                if exited is not None or time.monotonic() > deadline:
                    log_tail = log_path.read_text(errors="replace")[-2000:]
                    pytest.fail(f"llama_cpp.server did not start (exit {exited}):\n{log_tail}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def fabric(engine_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    topology = f"""
gateway: {{demo_keys: true, health_interval_s: 0.2}}
points:
  - {{name: lima-llama, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {{kind: proxy, upstream_url: "{engine_url}"}},
     prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 0.02, output_usd_per_1m: 0.04}}}}}}
tenants:
  - {{name: demo-peru, allowed_jurisdictions: [PE]}}
"""
    fab = Fabric.from_yaml(topology, tmp_path_factory.mktemp("llama-fabric"))
    yield fab
    fab.close()


MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a colour."}]


def test_the_upstream_model_is_listed(fabric: Fabric, engine_url: str) -> None:
    assert [m.id for m in fabric.client("demo-peru").models.list().data] == [MODEL]
    cards = _get_json(f"{fabric.point_url('lima-llama')}/v1/models")
    assert isinstance(cards, dict)
    assert [(c["id"], c["owned_by"]) for c in cards["data"]] == [(MODEL, "upstream")]


def test_a_chat_completion_is_served_and_metered_with_the_engines_counts(
    fabric: Fabric, engine_url: str
) -> None:
    raw = fabric.client("demo-peru").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert raw.headers["x-grifo-point"] == "lima-llama"
    chat = raw.parse()
    assert chat.choices[0].message.content
    assert chat.usage is not None
    # the engine's own count of the same prompt, asked directly
    request = urllib.request.Request(
        f"{engine_url}/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as resp:
        direct = json.loads(resp.read())["usage"]
    assert chat.usage.prompt_tokens == direct["prompt_tokens"] > 0
    assert 0 < chat.usage.completion_tokens <= 8
    request_id = raw.headers["x-request-id"]
    entry = fabric.ledger(request_id)[request_id]
    assert (entry.prompt_tokens, entry.completion_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert (entry.status, entry.usage_source, entry.point) == ("ok", "point", "lima-llama")
    assert entry.cost_micros > 0


def test_a_streamed_chat_completion_is_served_and_metered(fabric: Fabric) -> None:
    client = fabric.client("demo-peru")
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.usage is None for c in chunks)
    # llama_cpp.server 0.3.36 sends no usage chunk, even when asked (the gateway always asks):
    # the gateway bills the content events it relayed, and prompt tokens estimated from the
    # request (4 bytes a token), since a proxy point cannot say how many there were. The
    # client may close as soon as it reads `[DONE]`, before the upstream's end reached the
    # gateway: the stream was still delivered whole.
    entry = fabric.ledger(request_id)[request_id]
    assert entry.usage_source == "estimated"
    assert entry.status == "ok"
    assert 0 < entry.completion_tokens <= 8
    assert 0 < entry.prompt_tokens < 40  # a short message and the chat template's share
    assert entry.cost_micros > 0  # the output tokens, and the point's time


def test_load_without_metrics_or_slots_is_the_points_own_count(fabric: Fabric) -> None:
    """llama_cpp.server has no `/metrics`, `/slots` or `/props` (404): the point reports its
    own requests in flight, no queue, and an engine it cannot name."""
    load = _get_json(f"{fabric.point_url('lima-llama')}/load")
    assert load == {"in_flight": 0, "queued": 0, "engine": "unknown", "sources": []}
    states = {p.name: p for p in fabric.running.gateway.points}
    assert states["lima-llama"].healthy
    assert states["lima-llama"].queued == 0
