"""A point whose engine runs as a Ray Serve application (`engine.ray`, the `grifo[ray]` extra).

The point stays grifo's own HTTP server (same routes, validation, metering headers, receipts,
embeddings); only text generation moves into Serve. Each replica (`EngineReplica`) builds the
point's engine from its `EngineConfig` and runs it behind an `EngineRunner` of its own; Serve's
autoscaler keeps between `min_replicas` and `max_replicas` of them, adding one while they
average more than `target_ongoing_requests` requests each.

On the point, `RayGenerator` is a `BatchGenerator` for the point's `EngineRunner`: it streams
each generation from a replica (`handle.options(stream=True)`) and cancels the replica's
request when the job is cancelled. The point is the only client of its application, so what it
has sent and not yet seen start (`queued`) or finish (`in_flight`) is the aggregate load of
all replicas; `/load` and `/health` add `replicas`, the running replicas Serve reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from grifo.agent.tools.catalogue import Catalogue
from grifo.audit.signing import Signer
from grifo.config.load import ConfigError
from grifo.config.model import EngineConfig, PointConfig
from grifo.config.ray import RayConfig
from grifo.errors import GrifoError, PointUnavailableError
from grifo.http.message import Request, Response
from grifo.point.app import PointApp, PointIdentity
from grifo.point.engines.base import Generation, SamplingParams
from grifo.point.runner import EngineRunner, GenerationJob, Kind, Payload
from grifo.telemetry.tracing import for_point

log = logging.getLogger("grifo.point.ray")

_WATCH_S = 0.05  # how often cancelled jobs are looked for (the engines check between tokens)
_STATUS_TTL_S = 1.0  # /load and /health ask Serve for the replicas at most this often
_START_TIMEOUT_S = 600.0  # a replica builds its engine (llama.cpp loads its model) first

# What a replica streams back: a head, the pieces, an end; or, instead of a head, an error.
Head = tuple[int, int]  # prompt_tokens, cached_tokens
Piece = tuple[str, int]  # text, completion_tokens so far
End = tuple[int, str, None]  # completion_tokens, finish_reason


class EngineReplica:
    """One Serve replica: the point's engine behind an `EngineRunner` (made a deployment by
    `RayEngine.start`; Serve runs its async methods on the replica's event loop)."""

    def __init__(self, engine: EngineConfig) -> None:
        from grifo.point.server import build_engines

        local = msgspec.structs.replace(engine, ray=None, embeddings="none")
        generator, _ = build_engines(local)
        self.runner = EngineRunner(generator, None)

    def describe(self) -> tuple[str, int]:
        gen = self.runner.generator
        assert gen is not None
        return gen.model_id, gen.context_length

    async def generate(
        self, kind: Kind, payload: Payload, params: SamplingParams
    ) -> AsyncIterator[Head | Piece | End | Exception]:
        try:
            job = await self.runner.generate(kind, payload, params)
        except Exception as exc:  # refused (e.g. too long a prompt): the point answers with it
            yield exc
            return
        generation = job.started_future.result()
        yield generation.prompt_tokens, generation.cached_tokens
        done = False
        try:
            async for piece in job.pieces():
                yield piece, generation.completion_tokens
            done = True
        finally:
            if not done:  # the point cancelled the request (Serve cancels this generator)
                job.cancel()
        yield generation.completion_tokens, generation.finish_reason, None

    def __del__(self) -> None:  # Serve stops the replica
        with contextlib.suppress(Exception):
            self.runner.close()


@dataclasses.dataclass(slots=True, eq=False)
class _Call:
    sink: GenerationJob
    stream: Any = None  # Serve's DeploymentResponseGenerator
    task: asyncio.Task[None] | None = None
    stopped: bool = False  # cancelled by the watcher, not by close()


class RayGenerator:
    """The point's side of the Serve application: a `BatchGenerator` for its `EngineRunner`."""

    def __init__(self, handle: Any, model_id: str, context_length: int) -> None:
        self.model_id = model_id
        self.context_length = context_length
        self._stream = handle.options(stream=True)
        self._calls: set[_Call] = set()
        self._waiting = 0
        self._active = 0
        self._watcher: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(
        self, kind: Kind, payload: Payload, params: SamplingParams, sink: GenerationJob
    ) -> None:
        """Called on the point's event loop (`EngineRunner.generate`)."""
        call = _Call(sink)
        self._calls.add(call)
        self._waiting += 1
        call.task = asyncio.get_running_loop().create_task(self._run(call, kind, payload, params))
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _run(self, call: _Call, kind: Kind, payload: Payload, params: SamplingParams) -> None:
        generation: Generation | None = None
        error: BaseException | None = None
        try:
            call.stream = self._stream.generate.remote(kind, payload, params)
            async for item in call.stream:
                if isinstance(item, BaseException):
                    raise item
                if generation is None:  # the head: the replica's engine took the request
                    self._waiting, self._active = self._waiting - 1, self._active + 1
                    generation = Generation(item[0], iter(()), cached_tokens=item[1])
                    call.sink.started(generation)
                elif len(item) == 2:
                    call.sink.piece(item[0])
                    generation.completion_tokens = item[1]
                else:
                    generation.completion_tokens, generation.finish_reason = item[0], item[1]
        except (asyncio.CancelledError, Exception) as exc:
            error = _outcome(call, generation, exc)
        finally:
            self._calls.discard(call)
            if generation is None:
                self._waiting -= 1
            else:
                self._active -= 1
        if call.stopped and generation is None:  # nobody awaits its start any more
            call.sink.started_future.add_done_callback(_retrieved)
        call.sink.finished(error)

    async def _watch(self) -> None:
        """Cancel the Serve request of every cancelled job (its client left, a deadline)."""
        while self._calls:
            await asyncio.sleep(_WATCH_S)
            for call in list(self._calls):
                if call.sink.cancelled and not call.stopped and call.task is not None:
                    call.stopped = True
                    if call.stream is not None:
                        call.stream.cancel()
                    call.task.cancel()

    def close(self) -> None:
        for call in list(self._calls):
            if call.stream is not None:
                call.stream.cancel()
            if call.task is not None:
                call.task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


def _retrieved(future: asyncio.Future[Generation]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: asyncio logs no "never retrieved" error


def _outcome(
    call: _Call, generation: Generation | None, exc: BaseException
) -> BaseException | None:
    """What a stream that ended in `exc` means for its job (None: it ended normally)."""
    if call.stopped:  # the job was cancelled; whatever the stream raised on the way out
        if generation is None:
            return InterruptedError("cancelled before it started")
        generation.finish_reason = "cancelled"
        return None
    if isinstance(exc, asyncio.CancelledError):  # close(): the point is stopping
        return PointUnavailableError("the point is stopping")
    if isinstance(exc, GrifoError):  # the replica refused the request
        return exc
    log.warning("the Ray Serve engine failed: %s", type(exc).__name__)  # a replica died...
    return exc if generation is not None else PointUnavailableError("the Ray Serve engine failed")


class RayEngine:
    """One point's Serve application: deploy it, count its replicas, delete it. Every method
    blocks (Ray's calls do); the point runs them in worker threads."""

    def __init__(self, app_name: str, engine: EngineConfig, config: RayConfig) -> None:
        self.app_name = app_name
        self.engine = engine
        self.config = config
        self._connected = False  # ray.init ran here: stop a local Ray, leave a cluster

    def start(self) -> RayGenerator:
        import ray
        from ray import serve

        cfg = self.config
        if not ray.is_initialized():  # else: the caller's Ray (a test's, an embedding program's)
            # In a worker thread Ray leaves SIGTERM alone: the point drains on it. `local` starts
            # a Ray instance of its own even on a cluster node (no address would join that one).
            if cfg.address == "local":
                ray.init(address="local", include_dashboard=False)
            else:
                ray.init(address=cfg.address)
            self._connected = True
        serve.start(proxy_location="Disabled")  # no HTTP proxy: only the point calls it
        target = cfg.target_ongoing_requests
        deployment = serve.deployment(
            name="engine",
            ray_actor_options={"num_cpus": self.replica_cpus(), "num_gpus": self.replica_gpus()},
            max_ongoing_requests=max(self.engine.parallel, math.ceil(2 * target)),
            autoscaling_config={
                "min_replicas": cfg.min_replicas,
                "initial_replicas": max(cfg.min_replicas, 1),
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": target,
            },
        )(EngineReplica)
        handle = serve.run(deployment.bind(self.engine), name=self.app_name, route_prefix=None)
        model_id, context_length = handle.describe.remote().result(timeout_s=_START_TIMEOUT_S)
        return RayGenerator(handle, model_id, context_length)

    def replica_cpus(self) -> float:
        """CPUs Ray reserves per replica: `replica_cpus`, else the engine's threads (one where
        they are `auto`: the replica measures its own count on whatever node it lands)."""
        if self.config.replica_cpus is not None:
            return self.config.replica_cpus
        return 1 if self.engine.threads == "auto" else self.engine.threads

    def replica_gpus(self) -> float:
        """GPUs Ray reserves per replica: `replica_gpus`, else one for an engine with GPU
        layers (Ray then sets each replica's CUDA_VISIBLE_DEVICES to its own)."""
        if self.config.replica_gpus is not None:
            return self.config.replica_gpus
        return 1 if self.engine.gpu_layers else 0

    def replicas(self) -> dict[str, int]:
        """Serve's replica counts of the engine deployment, by state (RUNNING, STARTING...)."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        deployment = None if app is None else app.deployments.get("engine")
        if deployment is None:
            return {}
        # Keyed by the states' names, though typed as ReplicaState.
        states = deployment.replica_states.items()
        return {str(getattr(state, "value", state)): int(n) for state, n in states}

    def stop(self) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.delete(self.app_name)
        if self._connected and self.config.address == "local":
            shutdown: Any = serve.shutdown  # untyped in Ray
            shutdown()
        if self._connected:
            ray.shutdown()  # a cluster's Ray keeps running; this process only leaves it


class RayPointApp(PointApp):
    """A point whose generator is a `RayGenerator`: `/load` and `/health` add its replicas."""

    def __init__(self, *args: Any, ray_engine: RayEngine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ray_engine = ray_engine
        self._states: dict[str, int] = {}
        self._states_at = -math.inf
        self._lock = asyncio.Lock()

    async def replica_states(self) -> dict[str, int]:
        async with self._lock:
            if time.monotonic() - self._states_at > _STATUS_TTL_S:
                try:
                    self._states = await asyncio.to_thread(self.ray_engine.replicas)
                except Exception as exc:
                    log.warning("Ray Serve's status is unavailable: %s", type(exc).__name__)
                    raise PointUnavailableError("Ray Serve's status is unavailable") from exc
                self._states_at = time.monotonic()
            return self._states

    async def _replicas(self) -> dict[str, object]:
        states = await self.replica_states()
        return {
            "replicas": states.get("RUNNING", 0),
            "replicas_max": self.ray_engine.config.max_replicas,
            "replica_states": states,
        }

    async def load(self, request: Request) -> Response:
        body = dataclasses.asdict(self.runner.load()) | await self._replicas()
        return Response(200, msgspec.json.encode(body))

    async def health(self, request: Request) -> Response:
        response = await super().health(request)
        body = msgspec.json.decode(response.body) | await self._replicas()
        return Response(200, msgspec.json.encode(body))


async def build_ray_app(point: PointConfig, signer: Signer | None = None) -> RayPointApp:
    """`build_app` for a point with `engine.ray`: deploy the engine to Serve, embed locally."""
    from grifo.point.server import build_engines

    engine = point.engine
    assert engine is not None
    assert engine.ray is not None
    if engine.kind == "proxy":
        raise ConfigError(f"point {point.name}: engine.ray needs an embedded engine, not a proxy")
    ray_engine = RayEngine(f"grifo-{point.name}", engine, engine.ray)
    generator = await asyncio.to_thread(ray_engine.start)
    _reclaim_sigterm()
    try:
        # The embedder stays in the point (the discarded fake generator costs nothing).
        _, embedder = await asyncio.to_thread(
            build_engines, msgspec.structs.replace(engine, kind="fake", ray=None)
        )
        catalogue = await Catalogue.open(point.tools, embedder, point.jurisdiction)
    except BaseException:
        await asyncio.to_thread(ray_engine.stop)
        raise
    identity = PointIdentity(point.name, point.site, point.region, point.jurisdiction, point.tier)
    app = RayPointApp(
        identity,
        EngineRunner(generator, embedder),
        signer,
        for_point(point.name),
        tools=catalogue.tools,
        tool_jurisdictions=catalogue.jurisdictions,
        ray_engine=ray_engine,
    )
    app.closers.append(catalogue.aclose)
    app.closers.append(lambda: asyncio.to_thread(ray_engine.stop))
    return app


def _reclaim_sigterm() -> None:
    """Ray's crash handler takes SIGTERM when Ray starts, and aborts the process 3 s after one
    (absl's alarm), midway through the point's drain: give SIGTERM back to Python's handler."""
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def with_ray(point: PointConfig, address: str | None, replicas: str | None) -> PointConfig:
    """`grifo point --ray [ADDRESS] --ray-replicas MIN:MAX` over the point's `engine.ray`."""
    engine = point.engine or EngineConfig(kind="fake")  # as `build_app` does
    ray = msgspec.to_builtins(engine.ray or RayConfig())
    if address:
        ray["address"] = address
    if replicas:
        low, _, high = replicas.partition(":")
        ray.update(min_replicas=low, max_replicas=high or low)
    try:
        config = msgspec.convert(ray, RayConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"--ray/--ray-replicas: {exc}") from None
    return msgspec.structs.replace(point, engine=msgspec.structs.replace(engine, ray=config))
