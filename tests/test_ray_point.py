"""A point whose engine runs as a Ray Serve application (`engine.ray`, the `grifo[ray]` extra).

The Ray tests start one local Ray instance (2 CPUs, no dashboard) for the module and deploy a
fake-engine point with two replicas; they are skipped only where Ray is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
import uvloop

from grifo.config.load import ConfigError
from grifo.config.model import EngineConfig, PointConfig
from grifo.config.ray import RayConfig
from grifo.http.message import Request, Response, StreamResponse

T = TypeVar("T")
CHAT = "fake-chat"


def _point_config(**ray: Any) -> PointConfig:
    engine = EngineConfig(kind="fake", embeddings="fake", token_delay_ms=5, ray=RayConfig(**ray))
    return PointConfig(
        name="ray-edge",
        site="lima",
        region="sa-west",
        jurisdiction="PE",
        tier="edge",
        engine=engine,
    )


# -- configuration (no Ray needed) ----------------------------------------------------------------
def test_engine_ray_is_read_from_the_topology() -> None:
    raw = {"kind": "fake", "ray": {"address": "auto", "min_replicas": 1, "max_replicas": 4}}
    engine = msgspec.convert(raw, EngineConfig)
    assert engine.ray == RayConfig(address="auto", min_replicas=1, max_replicas=4)
    assert msgspec.convert({"kind": "fake"}, EngineConfig).ray is None
    with pytest.raises(msgspec.ValidationError, match="min_replicas must not exceed"):
        msgspec.convert({"ray": {"min_replicas": 3, "max_replicas": 2}}, EngineConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"ray": {"replicas": 3}}, EngineConfig)


def test_the_ray_flags_set_engine_ray() -> None:
    from grifo.point.ray_serve import with_ray

    plain = msgspec.structs.replace(_point_config(), engine=EngineConfig(kind="fake"))
    on = with_ray(plain, "", None)  # `grifo point --ray`
    assert on.engine is not None
    assert on.engine.ray == RayConfig()
    scaled = with_ray(plain, "ray://head:10001", "2:8")
    assert scaled.engine is not None
    assert scaled.engine.ray == RayConfig(
        address="ray://head:10001", min_replicas=2, max_replicas=8
    )
    kept = with_ray(_point_config(address="auto", max_replicas=3), None, "2")
    assert kept.engine is not None
    assert kept.engine.ray == RayConfig(address="auto", min_replicas=2, max_replicas=2)
    with pytest.raises(ConfigError, match="--ray"):
        with_ray(plain, "", "4:2")


# -- on a local Ray instance ----------------------------------------------------------------------
# Ray's own imports warn (pydantic v1-style fields); only warnings from Ray's modules are let be.
on_ray = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray = pytest.importorskip("ray", reason="Ray is not installed (the grifo[ray] extra)")
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Point:
    """A point built with `build_app`, on its own uvloop (the loop `grifo point` runs)."""

    loop: asyncio.AbstractEventLoop
    app: Any

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    def get(self, path: str) -> dict[str, Any]:
        response = self.call(self.app.handle(Request("GET", path, "", {}, b"")))
        assert isinstance(response, Response)
        assert response.status == 200, response.body
        body: dict[str, Any] = json.loads(response.body)
        return body


@pytest.fixture(scope="module")
def point(ray_instance: None) -> Iterator[Point]:
    from grifo.point.ray_serve import RayPointApp
    from grifo.point.server import build_app

    loop = uvloop.new_event_loop()
    config = _point_config(min_replicas=2, max_replicas=2, replica_cpus=0.5)
    app = loop.run_until_complete(asyncio.wait_for(build_app(config), 120))
    assert isinstance(app, RayPointApp)
    try:
        yield Point(loop, app)
    finally:
        for close in app.closers:
            loop.run_until_complete(close())
        app.runner.close()
        loop.close()


def _chat(content: str, **extra: Any) -> Request:
    body = {"model": CHAT, "messages": [{"role": "user", "content": content}], **extra}
    return Request("POST", "/v1/chat/completions", "", {}, json.dumps(body).encode())


async def _frames(response: StreamResponse, keep: int | None = None) -> list[bytes]:
    """The stream's SSE frames; with `keep`, the client goes away after that many."""
    frames: list[bytes] = []
    completed = False
    try:
        async for frame in response.body:
            frames.append(frame)
            if keep is not None and len(frames) >= keep:
                return frames
        completed = True
    finally:
        if response.on_close is not None:
            await response.on_close(completed)
    return frames


def _events(frames: list[bytes]) -> list[Any]:
    text = b"".join(frames).decode()
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


@on_ray
def test_a_chat_completion_runs_on_a_replica(point: Point) -> None:
    response = point.call(point.app.handle(_chat("one two three")))
    assert isinstance(response, Response)
    assert response.status == 200, response.body
    answer = json.loads(response.body)
    assert answer["model"] == CHAT
    assert answer["choices"][0]["message"]["content"] == "one two three"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == 4
    assert answer["usage"]["completion_tokens"] == 3
    assert (b"x-grifo-point", b"ray-edge") in response.headers


@on_ray
def test_a_streamed_chat_completion_arrives_piece_by_piece(point: Point) -> None:
    request = _chat("alpha beta gamma delta", stream=True, stream_options={"include_usage": True})
    response = point.call(point.app.handle(request))
    assert isinstance(response, StreamResponse)
    assert (b"x-grifo-prompt-tokens", b"5") in response.headers
    events = _events(point.call(_frames(response)))
    deltas = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert "".join(d for d in deltas if d) == "alpha beta gamma delta"
    assert len([d for d in deltas if d]) == 4  # one piece per token
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 4


@on_ray
def test_a_completion_and_an_unknown_model(point: Point) -> None:
    body = json.dumps({"model": CHAT, "prompt": "red green", "max_tokens": 5}).encode()
    response = point.call(point.app.handle(Request("POST", "/v1/completions", "", {}, body)))
    assert isinstance(response, Response)
    assert json.loads(response.body)["choices"][0]["text"] == "red green"
    body = json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode()
    missing = point.call(point.app.handle(Request("POST", "/v1/chat/completions", "", {}, body)))
    assert isinstance(missing, Response)
    assert missing.status == 404


@on_ray
def test_load_and_health_report_the_replicas(point: Point) -> None:
    load = point.get("/load")
    assert load["replicas"] == 2
    assert load["replicas_max"] == 2
    assert load["in_flight"] == 0
    assert load["queued"] == 0
    assert load["completed"] >= 1
    health = point.get("/health")
    assert health["status"] == "ready"
    assert health["replicas"] == 2
    assert [m["id"] for m in health["models"]] == [CHAT, "fake-embed"]


@on_ray
def test_load_counts_generations_on_every_replica_and_a_client_leaving_stops_them(
    point: Point,
) -> None:
    """Four long streams over two replicas (the fake engine runs one generation at a time):
    `/load` counts all four, running or queued. Their clients go away (those running after a
    piece, the others before theirs starts), the replicas stop them, and a new request runs."""
    long_text = " ".join(f"w{i}" for i in range(2048))  # 2048 tokens of 5 ms: 10 s each

    async def load() -> dict[str, Any]:
        response = await point.app.handle(Request("GET", "/load", "", {}, b""))
        body: dict[str, Any] = json.loads(response.body)
        return body

    async def until(check: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while not check(seen := await load()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return seen

    async def scenario() -> tuple[dict[str, Any], list[list[bytes]], dict[str, Any]]:
        calls = [
            asyncio.ensure_future(point.app.handle(_chat(long_text, stream=True))) for _ in range(4)
        ]
        # all four counted, and the replicas have started on theirs
        during = await until(lambda s: s["in_flight"] + s["queued"] == 4 and s["in_flight"] > 0)
        frames = []
        for call in calls:
            if call.done():
                frames.append(await _frames(call.result(), keep=2))
            else:
                call.cancel()
        after = await until(lambda s: s["in_flight"] == 0 and s["queued"] == 0)
        return during, frames, after

    during, frames, after = point.call(scenario())
    # Serve's router picks the replica (usually one each, by their queues).
    assert during["in_flight"] + during["queued"] == 4
    assert 1 <= during["in_flight"] <= 2
    assert during["replicas"] == 2
    # A replica may start its stream between the `/load` read and the look at the calls: the
    # streams that had started are one or two, and each gave its piece.
    assert 1 <= len(frames) <= 2
    assert all(len(f) == 2 for f in frames)
    assert (after["in_flight"], after["queued"]) == (0, 0)
    # Were the replicas still generating, this would wait for them (10 s).
    response = point.call(point.app.handle(_chat("still here")), timeout_s=6)
    assert isinstance(response, Response)
    assert json.loads(response.body)["choices"][0]["message"]["content"] == "still here"


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@on_ray
def test_grifo_point_ray_starts_its_own_ray_and_stops_it_on_sigterm(
    ray_instance: None, tmp_path: Any
) -> None:
    """`grifo point --ray`: a local Ray instance of its own (beside the module's), one replica
    serving; SIGTERM drains the point and stops that Ray, every process of it."""
    command = [sys.executable, "-m", "grifo", "point", "--engine", "fake", "--ray"]
    command += ["--name", "ray-cli", "--jurisdiction", "PE", "--port", "0"]
    env = {**os.environ, "GRIFO_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    ray_processes: set[int] = set()
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]  # the pytest timeout bounds this
        url = f"http://127.0.0.1:{port}"
        body = {"model": CHAT, "messages": [{"role": "user", "content": "from the cli"}]}
        post = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode())
        with urllib.request.urlopen(post, timeout=30) as response:
            answer = json.load(response)
        assert answer["choices"][0]["message"]["content"] == "from the cli"
        with urllib.request.urlopen(f"{url}/load", timeout=30) as response:
            assert json.load(response)["replicas"] == 1
        ray_processes = _descendants(proc.pid)
        assert ray_processes  # raylet, GCS, the Serve controller and replica...
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while any(map(_alive, ray_processes)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in ray_processes if _alive(pid)]
    finally:
        for pid in [proc.pid, *ray_processes]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
