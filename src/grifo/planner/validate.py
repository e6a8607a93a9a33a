"""The simulator against reality: replay the same trace slice through a real `grifo serve` with
the topology's points, and compare latency percentiles and placement with the simulation.

Both see the same requests, tenants and dependencies. A request is a chat message of
`prompt − 1` words asking for `completion` tokens; with the fake engine (one word, one token;
an answer cycles the prompt's words) that is exactly the trace's counts once the prompt is at
least one token longer than the answer, so prompts are raised to that first, for both runs.
Other engines get the same text; their token counts differ from the trace's.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from grifo.config.model import GrifoConfig, StoreConfig, TenantConfig
from grifo.http.client import ConnectionPool
from grifo.planner.calibrate import stop_process
from grifo.planner.metrics import percentile
from grifo.planner.plan import Plan
from grifo.planner.trace import TraceRequest


class ValidationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Measured:
    index: int
    point: str | None
    status: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class Comparison:
    sim_p50_ms: float
    real_p50_ms: float
    sim_p99_ms: float
    real_p99_ms: float
    p50_error: float  # |sim − real| / real
    real_failed: int
    sim_share: dict[str, float]
    real_share: dict[str, float]

    def lines(self, target: float = 0.2) -> list[str]:
        verdict = "within" if self.p50_error <= target else "outside"
        lines = [
            "| | simulated | real |",
            "|---|---:|---:|",
            f"| p50 latency ms | {self.sim_p50_ms:,.1f} | {self.real_p50_ms:,.1f} |",
            f"| p99 latency ms | {self.sim_p99_ms:,.1f} | {self.real_p99_ms:,.1f} |",
        ]
        lines += [
            f"| share on {name} | {self.sim_share.get(name, 0):.0%} "
            f"| {self.real_share.get(name, 0):.0%} |"
            for name in sorted(set(self.sim_share) | set(self.real_share))
        ]
        lines += [
            "",
            f"p50 error: {self.p50_error:.1%} ({verdict} the {target:.0%} target); "
            f"real requests failed: {self.real_failed}.",
            "",
            "The real run replays the same requests, tenants and dependencies through "
            "`grifo serve` on this topology, its points started locally: the simulation "
            "charges each point's `rtt_ms` as network time, which local points do not have.",
        ]
        return lines


def fit_for_fake(requests: Sequence[TraceRequest]) -> list[TraceRequest]:
    """Prompts at least one token longer than their answers (see the module's docstring)."""
    return [
        replace(r, prompt_tokens=max(r.prompt_tokens, r.completion_tokens + 1)) for r in requests
    ]


def compare(plan: Plan, measured: Sequence[Measured], strategy: str = "grifo") -> Comparison:
    result = next(r for r in plan.results if r.strategy == strategy)
    sim = [o.latency_ms for o in result.outcomes if o.point is not None]
    ok = [m for m in measured if m.status == 200]
    real = [m.latency_ms for m in ok]
    sim_p50, real_p50 = percentile(sim, 50), percentile(real, 50)
    served = [o.point for o in result.outcomes if o.point is not None]
    return Comparison(
        sim_p50_ms=sim_p50,
        real_p50_ms=real_p50,
        sim_p99_ms=percentile(sim, 99),
        real_p99_ms=percentile(real, 99),
        p50_error=abs(sim_p50 - real_p50) / real_p50 if real_p50 > 0 else math.nan,
        real_failed=len(measured) - len(ok),
        sim_share=_shares(served),
        real_share=_shares([m.point for m in ok]),
    )


def _shares(points: Sequence[str | None]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in points:
        if p is not None:
            out[p] = out.get(p, 0.0) + 1 / len(points)
    return out


def serving_config(config: GrifoConfig) -> GrifoConfig:
    """The topology as a throwaway gateway runs it: demo keys, SQLite, no configured keys."""
    gateway = msgspec.structs.replace(config.gateway, demo_keys=True, store=StoreConfig())
    return msgspec.structs.replace(
        config,
        gateway=gateway,
        tenants=config.tenants or [TenantConfig(name="anyone")],
        keys=[],
    )


def run_real(plan: Plan, timeout_s: float = 300.0) -> list[Measured]:
    """Start `grifo serve` on the topology, replay the plan's requests, stop it."""
    with tempfile.TemporaryDirectory(prefix="grifo-validate-") as tmp:
        path = Path(tmp) / "grifo.yaml"
        path.write_bytes(msgspec.json.encode(serving_config(plan.config)))
        state = Path(tmp) / "state"
        args = [sys.executable, "-m", "grifo", "serve", "--config", str(path), "--port", "0"]
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [*args, "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=tmp,
        )
        try:
            assert proc.stdout is not None
            banner = proc.stdout.readline()
            if "/v1" not in banner:
                raise ValidationError(f"grifo serve did not start (said {banner!r})")
            port = int(banner.rsplit(":", 1)[1].split("/")[0])
            keys = json.loads((state / "demo-keys.json").read_text(encoding="utf-8"))
            return asyncio.run(asyncio.wait_for(_replay(plan, port, keys), timeout_s))
        finally:
            stop_process(proc)


async def _replay(plan: Plan, port: int, keys: dict[str, str]) -> list[Measured]:
    pool = ConnectionPool("127.0.0.1", port)
    by_index = {r.index: r for r in plan.requests}
    children: dict[int, list[int]] = {}
    for r in plan.requests:
        if r.after is not None and r.after in by_index:
            children.setdefault(r.after, []).append(r.index)
    results: list[Measured] = []
    tenant0 = next(iter(keys))

    async def send(r: TraceRequest, tenant: str) -> Measured:
        words = " ".join(f"w{i % 97}" for i in range(max(r.prompt_tokens - 1, 1)))
        body = msgspec.json.encode(
            {
                "model": plan.model,
                "messages": [{"role": "user", "content": words}],
                "max_tokens": r.completion_tokens,
            }
        )
        headers = [
            (b"authorization", f"Bearer {keys[tenant]}".encode()),
            (b"content-type", b"application/json"),
        ]
        start = time.perf_counter()
        resp = await pool.request(
            "POST", "/v1/chat/completions", headers=headers, body=body, head_timeout_s=300
        )
        await resp.read()
        elapsed = (time.perf_counter() - start) * 1000
        return Measured(r.index, resp.header(b"x-grifo-point"), resp.status, elapsed)

    async def task(r: TraceRequest, at: float) -> None:
        await asyncio.sleep(max(at - time.perf_counter(), 0))
        m = await send(r, plan.tenants[r.index])
        results.append(m)
        await asyncio.gather(*(task(by_index[c], 0) for c in children.get(r.index, ())))

    try:
        for _ in range(2):  # warm connections and the points' first answers, not measured
            await send(replace(plan.requests[0], completion_tokens=2), tenant0)
        t0 = time.perf_counter() + 0.05
        roots = [r for r in plan.requests if r.after is None or r.after not in by_index]
        await asyncio.gather(*(task(r, t0 + r.arrival_s) for r in roots))
    finally:
        await pool.close()
    return sorted(results, key=lambda m: m.index)
