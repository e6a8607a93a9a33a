"""`threads: auto`: the engine measures which thread count decodes fastest, once per host."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import msgspec
import pytest

from grifo.config.model import EngineConfig
from grifo.cpus import available_cpus
from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.engines.batching import BatchedLlamaGenerator
from grifo.point.engines.threads import ThreadChoices, candidates, choose
from tests.support.tiny_gguf import write_tiny_gguf


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])],
)
def test_candidates(cpus: int, expected: list[int]) -> None:
    assert candidates(cpus) == expected


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({1: 10.0, 2: 6.0, 4: 3.5, 8: 3.0}, 8),  # more keeps paying
        ({1: 10.0, 2: 6.0, 4: 5.8, 8: 7.0}, 2),  # 4 is not 5% better than 2
        ({1: 5.0, 2: 6.0}, 1),  # a busy host: the second thread only costs
        ({1: 10.0, 2: 9.6, 4: 4.0}, 4),  # judged against the best so far, not the neighbour
    ],
)
def test_choose(times: dict[int, float], expected: int) -> None:
    assert choose(times) == expected


def test_choices_survive_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "threads.json"
    path.write_text("{not json")
    choices = ThreadChoices(path)
    assert choices.get("k") is None
    choices.put("k", 4)
    assert ThreadChoices(path).get("k") == 4
    path.write_text(json.dumps({"k": "many", "j": 0}))
    assert choices.get("k") is None
    assert choices.get("j") is None


def test_config_threads_default_to_auto_and_refuse_nonsense() -> None:
    assert EngineConfig().threads == "auto"
    assert msgspec.convert({"threads": 3}, EngineConfig).threads == 3
    for bad in ("many", 0, -1):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"threads": bad}, EngineConfig)


class _Sink:
    def __init__(self) -> None:
        self.cancelled = False
        self.text: list[str] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def started(self, generation: Generation) -> None:
        pass

    def piece(self, text: str) -> None:
        self.text.append(text)

    def finished(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


def _generate(engine: BatchedLlamaGenerator, prompt: str) -> str:
    sink = _Sink()
    engine.submit("completion", prompt, SamplingParams(max_tokens=10, temperature=0), sink)
    assert sink.done.wait(30)
    assert sink.error is None
    return "".join(sink.text)


@pytest.mark.engine
def test_auto_measures_once_and_then_remembers(tmp_path: Path) -> None:
    from llama_cpp import llama_cpp as capi

    model = write_tiny_gguf(tmp_path / "tiny.gguf", seed=5)
    remembered = tmp_path / "cache" / "threads.json"
    first = BatchedLlamaGenerator(
        model, "tiny", context_length=128, slots=3, threads="auto", thread_choices=remembered
    )
    try:
        assert sorted(first.measured) == candidates(available_cpus())
        assert all(seconds > 0 for seconds in first.measured.values())
        assert first.threads == choose(first.measured)
        assert capi.llama_n_threads(first._ctx.ctx) == first.threads  # what decoding uses
        text = _generate(first, "hello world")
    finally:
        first.close()
    assert json.loads(remembered.read_text()) == {
        ThreadChoices.key(model, 3, available_cpus()): first.threads
    }
    again = BatchedLlamaGenerator(
        model, "tiny", context_length=128, slots=3, threads="auto", thread_choices=remembered
    )
    fixed = BatchedLlamaGenerator(model, "tiny", context_length=128, slots=3, threads=first.threads)
    try:
        assert again.measured == {}  # remembered: nothing timed
        assert again.threads == first.threads
        assert capi.llama_n_threads(again._ctx.ctx) == first.threads
        # The timing steps leave nothing behind in the cache: answers are the engine's usual.
        assert _generate(again, "hello world") == text == _generate(fixed, "hello world")
    finally:
        again.close()
        fixed.close()
    wider = BatchedLlamaGenerator(
        model, "tiny", context_length=128, slots=2, threads="auto", thread_choices=remembered
    )
    try:
        assert wider.measured  # another batch width: measured afresh
    finally:
        wider.close()


@pytest.mark.parametrize(("given", "expected"), [("auto", "auto"), ("6", 6), (None, "auto")])
def test_point_threads_flag(given: str | None, expected: int | str) -> None:
    from grifo.cli import _parser

    args = ["point", "--name", "p", "--jurisdiction", "PE"]
    parsed = _parser().parse_args([*args, "--threads", given] if given else args)
    assert parsed.threads == expected


@pytest.mark.parametrize("given", ["0", "many", "-2"])
def test_point_threads_flag_refuses_nonsense(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from grifo.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["point", "--name", "p", "--jurisdiction", "PE", "--threads", given])
    assert exit_.value.code == 2
    assert "--threads" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("threads", "replica_cpus", "reserved"),
    [("auto", None, 1), (4, None, 4), ("auto", 2.5, 2.5), (4, 0.5, 0.5)],
)
def test_ray_reserves_cpus_per_replica(
    threads: int | str, replica_cpus: float | None, reserved: float
) -> None:
    from grifo.config.ray import RayConfig
    from grifo.point.ray_serve import RayEngine

    engine = msgspec.convert({"threads": threads}, EngineConfig)
    ray = RayEngine("app", engine, RayConfig(replica_cpus=replica_cpus))
    assert ray.replica_cpus() == reserved


@pytest.mark.parametrize(
    ("gpu_layers", "replica_gpus", "reserved"),
    [(0, None, 0), ("all", None, 1), (12, None, 1), ("all", 0.5, 0.5), (0, 1.0, 1.0)],
)
def test_ray_reserves_a_gpu_per_replica_of_a_gpu_engine(
    gpu_layers: int | str, replica_gpus: float | None, reserved: float
) -> None:
    from grifo.config.ray import RayConfig
    from grifo.point.ray_serve import RayEngine

    engine = msgspec.convert({"gpu_layers": gpu_layers}, EngineConfig)
    ray = RayEngine("app", engine, RayConfig(replica_gpus=replica_gpus))
    assert ray.replica_gpus() == reserved


@pytest.mark.engine
def test_a_remembered_count_is_what_decoding_uses(tmp_path: Path) -> None:
    """The context starts with every CPU; a remembered count of 1 must replace that."""
    from llama_cpp import llama_cpp as capi

    model = write_tiny_gguf(tmp_path / "tiny.gguf", seed=5)
    remembered = tmp_path / "threads.json"
    ThreadChoices(remembered).put(ThreadChoices.key(model, 2, available_cpus()), 1)
    engine = BatchedLlamaGenerator(
        model, "tiny", context_length=128, slots=2, threads="auto", thread_choices=remembered
    )
    try:
        assert (engine.threads, engine.measured) == (1, {})
        assert capi.llama_n_threads(engine._ctx.ctx) == 1
        assert capi.llama_n_threads_batch(engine._ctx.ctx) == 1
        assert _generate(engine, "hello world")
    finally:
        engine.close()
