"""Gateways that take turns under load: each variant's gateway is started once, all on CPU 1
(wrk and the mock point on CPU 0), and they are measured in short rounds, each round starting
with the next variant, so that pairs are seconds apart on a host whose speed drifts over
minutes. Used by `budgets.py` (budget configs) and `ab.py` (two revisions)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import NamedTuple

import uvloop
from compare import stream_load, tree, tree_cpu_s
from overhead import GATEWAY_PORT, KEY, LUA, run_wrk, start_gateway, start_mock


class Round(NamedTuple):
    rps: float  # or streams/s
    cpu_ms: float  # gateway CPU per request (or stream)
    p50_ms: float  # latency (or time to the first token)
    p99_ms: float = 0.0


class Variant(NamedTuple):
    name: str
    config: str  # bench.yaml, as `overhead.CONFIG`
    source: Path | None = None  # a checkout to run instead of the installed grifo
    python: str | None = None  # another interpreter (a virtual environment with grifo's deps)


def measure(
    port: int,
    gateway: subprocess.Popen[bytes],
    work: Path,
    seconds: int,
    connections: int = 64,
    streams: int = 0,
) -> Round:
    """wrk at `connections`; or, with `streams`, that many concurrent streams (`compare.py`'s
    stream test): streams/s, CPU per stream and the time to the first token."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    pids = tree(gateway.pid)  # the supervisor and its workers
    before = tree_cpu_s(pids)
    if streams:
        got = uvloop.run(stream_load(port, KEY, seconds, streams))
        spent = tree_cpu_s(pids) - before
        if got["errors"] or not got["completed"]:
            raise RuntimeError(f"failed streams: {got}")
        ttft, tail = got["ttft_p50_ms"], got["ttft_p99_ms"]
        return Round(got["completed"] / seconds, 1000 * spent / got["completed"], ttft, tail)
    result = run_wrk(url, connections, seconds, work / "post.lua")
    spent = tree_cpu_s(pids) - before
    assert result["non_2xx"] == 0, result
    cpu_ms = 1000 * spent / (result["rps"] * seconds)
    return Round(result["rps"], cpu_ms, result["p50_ms"], result["p99_ms"])


def take_turns(
    variants: list[Variant],
    work: Path,
    rounds: int,
    seconds: int,
    workers: int = 1,
    connections: int = 64,
    streams: int = 0,
) -> dict[str, list[Round]]:
    """Per variant, each round's measures (wrk with `connections` connections, or `streams`
    concurrent streams), in order."""
    (work / "post.lua").write_text(LUA)
    mock = start_mock()
    gateways: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    rates: dict[str, list[Round]] = {v.name: [] for v in variants}
    try:
        for n, variant in enumerate(variants):
            port = GATEWAY_PORT + 10 + n
            home = work / f"gateway-{n}"
            home.mkdir()
            config = variant.config.replace(f"port: {GATEWAY_PORT}", f"port: {port}")
            (home / "bench.yaml").write_text(config)
            gateway = start_gateway(home, port, workers, variant.source, python=variant.python)
            gateways[variant.name] = (port, gateway)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            run_wrk(url, 8, 2, work / "post.lua")  # warm-up
        for turn in range(rounds):
            start = turn % len(variants)
            for variant in variants[start:] + variants[:start]:
                got = measure(*gateways[variant.name], work, seconds, connections, streams)
                rates[variant.name].append(got)
                unit = "stream" if streams else "request"
                print(
                    f"round {turn + 1}, {variant.name}: {got.rps:,.0f} {unit}s/s, "
                    f"{got.cpu_ms:.3f} CPU ms/{unit}, "
                    f"{'TTFT ' if streams else ''}p50 {got.p50_ms:.3f} ms, p99 {got.p99_ms:.3f} ms"
                )
    finally:
        for _, gateway in gateways.values():
            gateway.send_signal(signal.SIGTERM)
        for _, gateway in gateways.values():
            gateway.wait(timeout=20)
        mock.send_signal(signal.SIGTERM)
        mock.wait(timeout=20)
    return rates
