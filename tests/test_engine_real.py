"""Real engines end to end: a tiny generated GGUF in llama.cpp, and MiniLM, behind the gateway."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_cpp import Llama, llama_cpp

from grifo.config.model import EngineConfig, PointConfig
from grifo.supervisor import PointStartError, start_point
from tests.support.fabric import Fabric, topology_yaml
from tests.support.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=7)


@pytest.fixture(scope="module")
def llama_fabric(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    engine = f"{{kind: llama_cpp, model: '{tiny_model}', model_id: tiny, context_length: 512}}"
    fab = Fabric.from_yaml(topology_yaml(engine), tmp_path_factory.mktemp("llama-fabric"))
    yield fab
    fab.close()


def _direct_greedy(model: Path, prompt: str, max_tokens: int) -> tuple[str, int, int]:
    llm = Llama(model_path=str(model), n_ctx=512, n_threads=1, verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, top_k=1)
    finally:
        llm.close()
    usage = out["usage"]  # type: ignore[index]
    return out["choices"][0]["text"], usage["prompt_tokens"], usage["completion_tokens"]  # type: ignore[index]


def test_completion_matches_llama_cpp_run_directly(llama_fabric: Fabric, tiny_model: Path) -> None:
    prompt = "the quick brown fox jumps over the lazy dog"
    raw = llama_fabric.client("demo-eu").completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0
    )
    completion = raw.parse()
    text, prompt_tokens, completion_tokens = _direct_greedy(tiny_model, prompt, 12)
    assert completion.choices[0].text == text
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        prompt_tokens,
        completion_tokens,
    )
    assert raw.headers["x-grifo-point"] == "frankfurt-regional"


def test_chat_stream_equals_plain_chat(llama_fabric: Fabric) -> None:
    client = llama_fabric.client("demo-latam")
    messages = [{"role": "user", "content": "hello world"}]
    plain = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage is not None
    assert plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_prompt_longer_than_context_is_a_400(llama_fabric: Fabric) -> None:
    import openai

    long_prompt = "hello world " * 600
    with pytest.raises(openai.BadRequestError) as failure:
        llama_fabric.client("demo-global").completions.create(
            model="tiny", prompt=long_prompt, max_tokens=4
        )
    assert failure.value.code == "context_length_exceeded"


def test_minilm_embeddings_through_the_gateway(tmp_path: Path) -> None:
    engine = "{kind: fake, embeddings: minilm}"
    fab = Fabric.from_yaml(topology_yaml(engine), tmp_path)
    try:
        result = fab.client("demo-global").embeddings.create(
            model="all-minilm-l6-v2",
            input=["The cat sat on the mat", "A cat is sitting on a mat", "Quarterly revenue"],
        )
    finally:
        fab.close()
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    assert result.usage.prompt_tokens > 10


def test_point_metrics_show_the_engine_at_work(llama_fabric: Fabric) -> None:
    """The point's /metrics report the engine's threads (measured: `threads: auto`), the
    prompt tokens it reused from a cached prefix, and its cache copies."""
    client = llama_fabric.client("demo-eu")
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    for _ in range(2):  # the second request reuses the first one's prompt
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    url = llama_fabric.point_url("frankfurt-regional")
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grifo_point_engine_")
    }
    assert values["grifo_point_engine_threads"] >= 1
    assert values["grifo_point_engine_gpu_layers"] == 0  # `gpu_layers` unset: all on the CPU
    assert values["grifo_point_engine_reused_prompt_tokens_total"] >= 16
    assert 'grifo_point_engine_cache_copies_total{reason="prefix"}' in values
    assert 'grifo_point_engine_cache_copies_total{reason="gap"}' in values


@pytest.mark.skipif(
    bool(llama_cpp.llama_supports_gpu_offload()), reason="this llama-cpp-python has a GPU backend"
)
def test_a_point_asked_for_gpu_layers_on_a_cpu_build_says_why_it_did_not_start(
    tiny_model: Path, tmp_path: Path
) -> None:
    """No traceback in the point's log and no silent fallback to the CPU: the supervisor's
    error (what `grifo serve` prints) carries the point's one-line reason."""
    config = PointConfig(
        name="gpu-edge",
        site="s",
        region="r",
        jurisdiction="DE",
        tier="edge",
        engine=EngineConfig(model=str(tiny_model), gpu_layers="all", embeddings="none"),
    )
    with pytest.raises(PointStartError) as info:
        asyncio.run(start_point(config, tmp_path / "logs", timeout_s=60))
    message = str(info.value)
    assert message.startswith("point gpu-edge did not start (point gpu-edge cannot start: ")
    assert "gpu_layers is 'all' but this llama-cpp-python has no GPU backend" in message
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in message
    log = (tmp_path / "logs" / "gpu-edge.log").read_text()
    assert "Traceback" not in log


@pytest.mark.skipif(
    bool(llama_cpp.llama_supports_gpu_offload()), reason="this llama-cpp-python has a GPU backend"
)
def test_serve_with_a_point_that_cannot_start_exits_with_its_reason(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(
        "gateway: {port: 0}\n"
        "points:\n"
        "  - {name: gpu-edge, site: s, region: r, jurisdiction: DE, tier: edge,\n"
        f"     engine: {{model: '{tiny_model}', gpu_layers: 3, embeddings: none}}}}\n"
    )
    state = str(tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-m", "grifo", "serve", "--config", str(config), "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("grifo: cannot serve: point gpu-edge did not start (point gpu-edge ")
    assert "gpu_layers is 3 but this llama-cpp-python has no GPU backend" in last
