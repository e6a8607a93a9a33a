"""Run one inference point as a process: load its engines, listen, report, stop on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import msgspec

from grifo.agent.tools.catalogue import Catalogue
from grifo.audit.signing import Signer, load_or_create
from grifo.config.load import parse_point_url
from grifo.config.model import EngineConfig, PointConfig
from grifo.http.client import ConnectionPool
from grifo.http.server import HttpServer
from grifo.point.app import PointApp, PointIdentity
from grifo.point.engines.base import Embedder, Generator
from grifo.point.join import JoinSettings, Membership
from grifo.point.runner import BatchGenerator, EngineRunner
from grifo.security.tls import server_context
from grifo.telemetry.tracing import for_point

log = logging.getLogger("grifo.point")


def build_engines(
    engine: EngineConfig,
) -> tuple[Generator | BatchGenerator | None, Embedder | None]:
    generator: Generator | BatchGenerator | None
    threads = 1 if engine.threads == "auto" else engine.threads  # the embedder's too
    if engine.kind == "fake":
        from grifo.point.engines.fake import FakeGenerator

        generator = FakeGenerator(
            engine.model_id or "fake-chat", engine.context_length, engine.token_delay_ms / 1000
        )
    else:
        from grifo.point.engines.batching import BatchedLlamaGenerator
        from grifo.point.engines.llama import requantized, resolve_model

        path, default_id = resolve_model(engine.model)
        cache = Path(os.environ.get("GRIFO_CACHE_DIR") or Path.home() / ".cache" / "grifo")
        if engine.quantization != "as-is":
            path = requantized(path, engine.quantization, cache / "models")
        generator = BatchedLlamaGenerator(
            path,
            engine.model_id or default_id,
            context_length=engine.context_length,
            threads=engine.threads,
            slots=engine.parallel,
            prefix_cache=engine.prefix_cache,
            thread_choices=cache / "threads.json",
            gpu_layers=engine.gpu_layers,
        )
        threads = generator.threads
    embedder: Embedder | None = None
    if engine.embeddings == "minilm":
        from grifo.point.engines.minilm import MiniLMEmbedder

        embedder = MiniLMEmbedder(threads=threads)
    elif engine.embeddings == "fake":
        from grifo.point.engines.fake import FakeEmbedder

        embedder = FakeEmbedder()
    return generator, embedder


async def build_app(point: PointConfig, signer: Signer | None = None) -> PointApp:
    identity = PointIdentity(point.name, point.site, point.region, point.jurisdiction, point.tier)
    engine = point.engine or EngineConfig(kind="fake")
    if engine.ray is not None:  # the engine runs as a Ray Serve application (grifo[ray])
        from grifo.point.ray_serve import build_ray_app

        return await build_ray_app(point, signer)
    if engine.kind == "proxy":
        from grifo.point.proxy import ProxyPointApp

        assert engine.upstream_url is not None
        target = parse_point_url(engine.upstream_url)
        assert target is not None
        proxy = ProxyPointApp(identity, ConnectionPool(*target), signer)
        await proxy.refresh_models()
        return proxy
    generator, embedder = await asyncio.to_thread(build_engines, engine)
    catalogue = await Catalogue.open(point.tools, embedder, point.jurisdiction)
    app = PointApp(
        identity,
        EngineRunner(generator, embedder),
        signer,
        for_point(point.name),
        tools=catalogue.tools,
        tool_jurisdictions=catalogue.jurisdictions,
    )
    app.closers.append(catalogue.aclose)
    return app


async def serve_point(
    point: PointConfig,
    host: str,
    port: int,
    parent_pid: int | None,
    key_file: Path | None = None,
    join: JoinSettings | None = None,
) -> None:
    stop = asyncio.Event()  # handlers first: a SIGTERM right after start-up must stop us cleanly
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    signer = None if key_file is None else load_or_create(key_file, point.name)
    app = await build_app(point, signer)
    server = HttpServer(app.handle)
    tls = None if point.tls is None else server_context(point.tls)
    bound = await server.start(host, port, tls=tls)
    # One JSON line on stdout tells a supervisor where we listen.
    sys.stdout.write(
        msgspec.json.encode({"event": "listening", "point": point.name, "port": bound}).decode()
        + "\n"
    )
    sys.stdout.flush()
    watch = loop.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    membership = None
    if join is not None:  # register with the gateways now that we listen
        scheme = "https" if point.tls is not None else "http"
        url = join.advertise_url or f"{scheme}://{host}:{bound}"
        membership = Membership(join, point, url, app)
        membership.start()
    await stop.wait()
    if watch is not None:
        watch.cancel()
    if membership is not None:
        await membership.leave()  # deregister; serve on until the gateways have seen it
    await server.close(grace_s=10.0)
    for close in app.closers:
        await close()
    app.runner.close()


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Exit with the supervisor, even if it was killed without a chance to stop us."""
    with contextlib.suppress(asyncio.CancelledError):
        while os.getppid() == parent_pid:  # noqa: ASYNC110 (no event exists for a parent's death)
            await asyncio.sleep(0.5)
        stop.set()
