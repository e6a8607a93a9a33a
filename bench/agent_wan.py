"""The same 8-step agent run with its loop next to its tools (an edge point) and with its loop at
a central point that reaches the same tools across a WAN, side by side in one run.

What runs (all on this machine, loopback only):
- a "site API" (the tools' backend, at the edge site): `POST /stock {"sku": ...}` answers a
  deterministic stock level at once;
- two `grifo point` processes with the same engine and the same HTTP tool `get_stock`:
  `edge-lima` (PE, edge tier, usd_per_hour 0.04) calls the site API directly; `central-gpu`
  (US, central tier, a GPU host at usd_per_hour 2.50) calls it through a WAN delay proxy;
- one `grifo serve` gateway at the edge site (where the user is): `edge-lima` is reached
  directly, `central-gpu` through a second WAN delay proxy. Tenant `at-edge` may only use PE,
  `at-central` only US, so each tenant's runs land on one topology.

WAN emulation: this kernel has no `sch_netem` (`tc qdisc ... netem` fails with "Specified qdisc
kind is unknown"), so a TCP delay proxy (`DelayProxy`) stands for the WAN: it forwards bytes both
ways and releases each chunk one one-way delay (RTT/2) after it arrived, in order and without
serialising (a chunk's release time is its arrival plus the delay, whatever else is queued). A
new connection pays the TCP handshake: the client's first bytes leave no earlier than one RTT
after it connected, as on a real link. No bandwidth limit, loss or jitter (the payloads are a
few hundred bytes). What crosses it in the central topology: the gateway<->point request and
the streamed answer (1 RTT per run on a pooled connection), and each tool call from the central
point to the site API (the HTTP tool opens a connection per call: handshake + request = 2 RTT).
The edge topology crosses no WAN.

Each run: `tool_choice: required`, `max_steps: 8`, so 7 `get_stock` calls and the answer at step
8 (checked: anything else stops the bench). Runs are streamed; the client times the request to
`run.completed` and the gaps between successive `model.step` events (one tool call plus one
model step). Cost: `usage.cost_micros` of `run.completed`, checked against the ledger row.
Runs alternate edge/central (ABBA) after one unmeasured warm-up run each.

Usage: python bench/agent_wan.py [--runs 10] [--rtt-ms 80] [--token-delay-ms 2]
       python bench/agent_wan.py --engine llama [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import platform
import select
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
Proc = subprocess.Popen[str]
KEYS = {
    "at-edge": "grf-0a9e0001-agent-wan-bench-edge-key-not-secret",
    "at-central": "grf-0a9e0002-agent-wan-bench-central-key-not-secret",
}
SKUS = ["A-100", "B-200", "C-300", "D-400", "E-500", "F-600", "G-700"]
TOOL_CALLS = len(SKUS)  # tool_choice required, max_steps 8: 7 calls, the answer at step 8
MAX_STEPS = TOOL_CALLS + 1
INSTRUCTIONS = (
    "You check stock levels. Call get_stock once for each SKU the user lists, one call per "
    "step, then answer with the total number of units on hand."
)
PROMPT = f"SKUs: {', '.join(SKUS)}. How many units are on hand in total?"
ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "fake": ("fake-chat", {"kind": "fake", "embeddings": "none"}),
    "llama": (
        "smollm2-135m-instruct",
        {"kind": "llama_cpp", "model": "smollm2", "threads": 1, "parallel": 2,
         "embeddings": "none"},
    ),
}  # fmt: skip
PRICES: dict[str, dict[str, Any]] = {
    "edge-lima": {
        "usd_per_hour": 0.04,
        "default": {"input_usd_per_1m": 0.02, "output_usd_per_1m": 0.04},
    },
    "central-gpu": {
        "usd_per_hour": 2.50,
        "default": {"input_usd_per_1m": 0.10, "output_usd_per_1m": 0.20},
    },
}


# ---- WAN emulation and the site API (asyncio, in a background thread) -----------------------
class DelayProxy:
    """A TCP forwarder standing for a WAN link of `rtt_s` round trip.

    Each chunk read from one side is released to the other at arrival + rtt_s/2, in order; a
    chunk never waits for the one before it beyond that (not serialised). Bytes the connecting
    side sends are also held until one RTT after it connected (the TCP handshake it would have
    waited for). EOF travels like data; a reset closes both sides."""

    def __init__(self, target_port: int, rtt_s: float) -> None:
        self.target_port = target_port
        self.rtt_s = rtt_s
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = asyncio.get_running_loop().time()
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        ends = (writer, up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, accepted + self.rtt_s, ends),
            self._pump(up_reader, writer, 0.0, ends),
        )
        for end in ends:
            end.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        not_before: float,
        ends: tuple[asyncio.StreamWriter, ...],
    ) -> None:
        loop = asyncio.get_running_loop()
        one_way = self.rtt_s / 2
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                at, data = await queue.get()
                if (wait := at - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        releaser = loop.create_task(release())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((max(loop.time(), not_before) + one_way, data))
                if not data:
                    break
            await releaser
        except (OSError, asyncio.IncompleteReadError):
            releaser.cancel()
            for end in ends:  # a reset on one side: drop the connection on both
                end.close()


class SiteApi:
    """The tools' backend at the edge site: `POST /stock {"sku": ...}` → a deterministic stock
    level, answered at once (HTTP/1.1, keep-alive)."""

    def __init__(self) -> None:
        self.calls = 0
        self.port = 0

    async def start(self) -> int:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return self.port

    @staticmethod
    def stock(sku: str) -> dict[str, Any]:
        digest = hashlib.sha256(sku.encode()).digest()
        on_hand = int.from_bytes(digest[:2], "big") % 500
        return {"sku": sku[:32], "on_hand": on_hand, "warehouse": "lima-1"}

    def _answer(self, method: str, path: str, body: bytes) -> tuple[str, bytes]:
        if method != "POST" or path.split("?")[0] != "/stock":
            return "404 Not Found", b'{"error": "not found"}'
        try:
            sku = str(json.loads(body)["sku"])
        except (ValueError, KeyError, TypeError):
            return "400 Bad Request", b'{"error": "send {\\"sku\\": \\"...\\"}"}'
        self.calls += 1
        return "200 OK", json.dumps(self.stock(sku)).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                fields = (line.partition(":") for line in head[1:] if line)
                headers = {name.strip().lower(): value.strip() for name, _, value in fields}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = self._answer(method, path, body)
                writer.write(
                    f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
            pass
        finally:
            writer.close()


class Background:
    """An event loop in a daemon thread for the site API and the proxies."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# ---- processes ----------------------------------------------------------------------------
class Procs:
    """Every process this script starts, each in its own session; all stopped at the end."""

    def __init__(self, work: Path) -> None:
        self.work, self.live = work, list[Proc]()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        with (self.work / f"{name}.log").open("a") as log:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.live.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.live):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.live):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.live.clear()


def first_line(proc: Proc, name: str, work: Path, timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        log = (work / f"{name}.log").read_text()[-2000:]
        why = f"{name} exited, or was silent for {timeout_s:.0f} s"
        raise RuntimeError(f"{why}; its log ends:\n{log}")
    return line


def tool(url: str) -> dict[str, Any]:
    return {
        "name": "get_stock",
        "description": "Units on hand of one SKU at the site's warehouse.",
        "url": url,
        "method": "POST",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"type": "string", "enum": SKUS}},
            "required": ["sku"],
            "additionalProperties": False,
        },
        "private": True,  # the site API is on loopback
        "timeout_s": 30,
    }


def start_fabric(
    procs: Procs, args: argparse.Namespace, site_port: int, tool_wan: DelayProxy, bg: Background
) -> tuple[str, Path, DelayProxy]:
    """Both points, the gateway→central WAN proxy and the gateway; (gateway url, state dir,
    that proxy)."""
    work = procs.work
    engine = dict(ENGINES[args.engine][1])
    if args.engine == "fake":
        engine["token_delay_ms"] = args.token_delay_ms
    where = {
        "edge-lima": {"site": "lima", "region": "sa-west", "jurisdiction": "PE", "tier": "edge"},
        "central-gpu": {
            "site": "virginia", "region": "us-east", "jurisdiction": "US", "tier": "central",
        },
    }  # fmt: skip
    tool_url = {
        "edge-lima": f"http://127.0.0.1:{site_port}/stock",
        "central-gpu": f"http://127.0.0.1:{tool_wan.port}/stock",
    }
    points = [
        {"name": name, **where[name], "engine": engine, "prices": PRICES[name],
         "tools": {"http": [tool(tool_url[name])]}}
        for name in where
    ]  # fmt: skip
    (work / "points.json").write_text(json.dumps({"points": points}, indent=1))
    started = []
    for name in where:
        argv = [sys.executable, "-m", "grifo", "point", "--config", str(work / "points.json")]
        argv += ["--name", name, "--port", "0", "--key-file", str(work / f"{name}.pem")]
        started.append((name, procs.start(name, argv)))
    ports = {}
    for name, proc in started:  # both load their engines at the same time
        ports[name] = int(json.loads(first_line(proc, name, work, 300))["port"])
    gateway_wan = DelayProxy(ports["central-gpu"], args.rtt_ms / 1000)
    bg.call(gateway_wan.start())
    urls = {
        "edge-lima": f"http://127.0.0.1:{ports['edge-lima']}",
        "central-gpu": f"http://127.0.0.1:{gateway_wan.port}",
    }
    rtt = {"edge-lima": 1.0, "central-gpu": args.rtt_ms}
    config = {
        "gateway": {"health_interval_s": 1.0},
        "points": [
            {"name": name, **where[name], "rtt_ms": rtt[name], "url": urls[name],
             "prices": PRICES[name]}
            for name in where
        ],
        "tenants": [
            {"name": "at-edge", "allowed_jurisdictions": ["PE"]},
            {"name": "at-central", "allowed_jurisdictions": ["US"]},
        ],
        "keys": [
            {"id": f"{tenant}-1", "tenant": tenant, "env": f"GRIFO_WAN_{i}"}
            for i, tenant in enumerate(KEYS)
        ],
    }  # fmt: skip
    path = work / "gateway.json"  # JSON is YAML
    path.write_text(json.dumps(config, indent=1))
    state = work / "state"
    argv = [sys.executable, "-m", "grifo", "serve", "--config", str(path), "--port", "0"]
    env = {f"GRIFO_WAN_{i}": key for i, key in enumerate(KEYS.values())}
    gateway = procs.start("gateway", [*argv, "--state-dir", str(state)], env)
    url = first_line(gateway, "gateway", work, 120).split()[-1].removesuffix("/v1")
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                ready = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                ready = json.loads(err.read())
        except OSError:
            ready = {"points": {}}
        points_now = ready.get("points", {})
        if len(points_now) == 2 and all(p["ready"] for p in points_now.values()):
            return url, state, gateway_wan
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway points not ready: {ready}")
        time.sleep(0.2)


# ---- one run ------------------------------------------------------------------------------
def one_run(
    url: str, tenant: str, model: str, args: argparse.Namespace, stream: bool = True
) -> dict[str, Any]:
    """One agent run, streamed (timings in ms from sending the request, per event) or whole."""
    body = {
        "model": model,
        "input": PROMPT,
        "instructions": INSTRUCTIONS,
        "tools": ["get_stock"],
        "tool_choice": "required",
        "limits": {"max_steps": MAX_STEPS, "max_step_tokens": args.step_tokens},
        "temperature": 0,
        "seed": 7,
        "stream": stream,
    }
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    headers = {"authorization": f"Bearer {KEYS[tenant]}", "content-type": "application/json"}
    events: list[tuple[float, dict[str, Any]]] = []
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/grifo/agent-runs", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise SystemExit(f"{tenant}: HTTP {resp.status}: {resp.read()[:500]!r}")
        if stream:
            while line := resp.readline():
                if line.startswith(b"data: {"):
                    ms = 1000 * (time.perf_counter() - started)
                    events.append((ms, json.loads(line[6:])))
            resp.read()
        else:
            whole = json.loads(resp.read())
            ms = 1000 * (time.perf_counter() - started)
            final = {k: v for k, v in whole.items() if k not in ("events", "object")}
            events = [
                (ms, e) for e in [*whole.get("events", []), {"type": "run.completed", **final}]
            ]
    finally:
        conn.close()
    point = resp.getheader("x-grifo-point", "?")
    kinds = [e.get("type", "error") for _, e in events]
    final = events[-1][1] if events else {}
    calls = kinds.count("tool.call")
    results = kinds.count("tool.result")
    if (
        calls != TOOL_CALLS
        or results != TOOL_CALLS
        or final.get("type") != "run.completed"
        or final.get("status") != "completed"
        or final.get("steps") != MAX_STEPS
    ):
        raise SystemExit(
            f"{tenant} on {point}: expected {TOOL_CALLS} tool calls and results and the answer "
            f"at step {MAX_STEPS}; got {calls} calls, {results} results, events {kinds}, "
            f"last event {json.dumps(final)[:600]}"
        )
    steps = [ms for ms, e in events if e.get("type") == "model.step"]
    return {
        "request_id": resp.getheader("x-request-id", ""),
        "point": point,
        "stream": stream,
        "wall_ms": events[-1][0],
        "first_event_ms": events[0][0],
        "step_gaps_ms": [b - a for a, b in itertools.pairwise(steps)],
        "cost_micros": final["usage"].get("cost_micros"),
        "header_cost_micros": int(resp.getheader("x-grifo-cost-micros", "-1")),
        "usage": final["usage"],
        "answer": final.get("output"),
    }


def ledger_costs(state: Path, request_ids: list[str]) -> dict[str, int]:
    """Ledger cost per request id, once the gateway's batched writer has stored them all."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.closing(
            sqlite3.connect(f"file:{state / 'grifo.db'}?mode=ro", uri=True)
        ) as db:
            query = "SELECT request_id, cost_micros FROM ledger"
            rows: dict[str, int] = {r: int(c) for r, c in db.execute(query).fetchall()}
        if all(r in rows for r in request_ids) or time.monotonic() > deadline:
            return {r: rows[r] for r in request_ids if r in rows}
        time.sleep(0.1)


# ---- report -------------------------------------------------------------------------------
def p90(values: list[float]) -> float:
    ranked = sorted(values)  # nearest rank
    return ranked[max(0, -(-9 * len(ranked) // 10) - 1)]


def token_micros(point: str, usage: dict[str, int]) -> int:
    """The token part of a run's cost, by grifo's formula (metering/pricing.py); the rest of
    `cost_micros` is the point's hourly price times the run's busy time there."""
    price = PRICES[point]["default"]
    per_1m = usage["prompt_tokens"] * round(price["input_usd_per_1m"] * 1e6) + usage[
        "completion_tokens"
    ] * round(price["output_usd_per_1m"] * 1e6)
    return int(-(-per_1m // 1_000_000))


def summary(runs: list[dict[str, Any]], ledger: dict[str, int]) -> dict[str, Any]:
    walls = [r["wall_ms"] for r in runs]
    costs = [r["cost_micros"] for r in runs]
    tokens = [token_micros(r["point"], r["usage"]) for r in runs]
    return {
        "runs": len(runs),
        "point": runs[0]["point"],
        "tool_calls_per_run": TOOL_CALLS,
        "median_ms": statistics.median(walls),
        "p90_ms": p90(walls),
        "min_ms": min(walls),
        "max_ms": max(walls),
        "median_step_ms": statistics.median(w / MAX_STEPS for w in walls),
        "median_step_gap_ms": statistics.median(g for r in runs for g in r["step_gaps_ms"]),
        "median_first_event_ms": statistics.median(r["first_event_ms"] for r in runs),
        "median_cost_micros": statistics.median(costs),
        "median_token_micros": statistics.median(tokens),
        "median_hardware_micros": statistics.median(
            c - t for c, t in zip(costs, tokens, strict=True)
        ),
        "ledger_matches": all(ledger.get(r["request_id"]) == r["cost_micros"] for r in runs),
        "median_tokens": statistics.median(r["usage"]["total_tokens"] for r in runs),
    }


def report(stats: dict[str, dict[str, Any]], args: argparse.Namespace, notes: list[str]) -> str:
    edge, central = stats["edge"], stats["central"]
    rows = [
        ("median run, request to run.completed (ms)", "median_ms", ".0f"),
        ("p90 run (ms)", "p90_ms", ".0f"),
        ("median per step: run / 8 (ms)", "median_step_ms", ".1f"),
        ("median gap between model.step events: tool call + next step (ms)",
         "median_step_gap_ms", ".1f"),
        ("median time to first event: run.started, sent with step 1 (ms)",
         "median_first_event_ms", ".1f"),
        ("median cost per run (micro-USD)", "median_cost_micros", ",.0f"),
        ("  of which tokens", "median_token_micros", ",.0f"),
        ("  of which hardware (usd_per_hour x busy time)", "median_hardware_micros", ",.0f"),
        ("median tokens per run (prompt + completion)", "median_tokens", ",.0f"),
    ]  # fmt: skip
    engine = ENGINES[args.engine][1]["kind"]
    if args.engine == "fake":
        engine += f", {args.token_delay_ms:g} ms/token"
    lines = [
        f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}",
        f"grifo agent runs, edge vs WAN: {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {os.getloadavg()[0]:.2f}, Python {platform.python_version()}; "
        f"engine {engine}; RTT {args.rtt_ms:g} ms; {args.runs} streamed runs each (+1 warm-up), "
        f"alternating; {TOOL_CALLS} tool calls + answer = {MAX_STEPS} steps per run",
        "",
        f"| measure | edge: loop next to tools ({edge['point']}) "
        f"| central: loop across the WAN ({central['point']}) | central / edge |",
        "|---|---:|---:|---:|",
        f"| tool calls per run (checked every run) | {TOOL_CALLS} | {TOOL_CALLS} | |",
    ]
    for label, key, fmt in rows:
        ratio = central[key] / edge[key] if edge[key] else float("nan")
        lines.append(f"| {label} | {edge[key]:{fmt}} | {central[key]:{fmt}} | x{ratio:.2f} |")
    return "\n".join([*lines, "", *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), default="fake")
    parser.add_argument("--runs", type=int, help="measured runs per topology (fake 10, llama 3)")
    parser.add_argument("--rtt-ms", type=float, default=80.0, help="emulated WAN round trip")
    parser.add_argument("--token-delay-ms", type=float, default=2.0, help="fake engine only")
    parser.add_argument("--step-tokens", type=int, default=48, help="max_step_tokens per step")
    args = parser.parse_args()
    args.runs = args.runs or (10 if args.engine == "fake" else 3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` cleans up
    work = Path(tempfile.mkdtemp(prefix="grifo-agent-wan-"))
    procs, bg = Procs(work), Background()
    model = ENGINES[args.engine][0]
    runs: dict[str, list[dict[str, Any]]] = {"edge": [], "central": []}
    tenants = {"edge": "at-edge", "central": "at-central"}
    try:
        site = SiteApi()
        bg.call(site.start())
        tool_wan = DelayProxy(site.port, args.rtt_ms / 1000)
        bg.call(tool_wan.start())
        url, state, gateway_wan = start_fabric(procs, args, site.port, tool_wan, bg)
        print(f"fabric up ({work}); running", file=sys.stderr, flush=True)
        for where in ("edge", "central"):  # warm-up: engines, pools, grammar caches
            one_run(url, tenants[where], model, args)
        wan_before = (tool_wan.connections, gateway_wan.connections)
        calls_before = site.calls
        for i in range(args.runs):
            order = ("edge", "central") if i % 2 == 0 else ("central", "edge")  # ABBA
            for where in order:
                run = one_run(url, tenants[where], model, args)
                runs[where].append(run)
                print(
                    f"{where:>7} run {i + 1}: {run['wall_ms']:.0f} ms on {run['point']}, "
                    f"{run['cost_micros']} micro-USD",
                    file=sys.stderr,
                    flush=True,
                )
        site_calls = site.calls - calls_before
        tool_conns = tool_wan.connections - wan_before[0]
        gw_conns = gateway_wan.connections - wan_before[1]
        # One whole (stream: false) run each: its x-grifo-cost-micros header is the run's cost.
        whole = {where: one_run(url, tenants[where], model, args, stream=False) for where in runs}
        ids = [r["request_id"] for group in [*runs.values(), whole.values()] for r in group]
        ledger = ledger_costs(state, ids)
    finally:
        procs.stop_all()
        bg.stop()
    expected = 2 * args.runs * TOOL_CALLS
    if site_calls != expected:
        raise SystemExit(f"the site API served {site_calls} calls, expected {expected}")
    stats = {where: summary(group, ledger) for where, group in runs.items()}
    connects = tool_conns / args.runs  # per central run: the HTTP tool's new connections
    trips = 1 + TOOL_CALLS + connects
    matches = all(s["ledger_matches"] for s in stats.values())
    heads = "; ".join(
        f"{where}: header {r['header_cost_micros']}, ledger {ledger.get(r['request_id'])} "
        f"({r['wall_ms']:.0f} ms)"
        for where, r in whole.items()
    )
    head_costs = {w: statistics.median(r["header_cost_micros"] for r in runs[w]) for w in runs}
    notes = [
        f"Cost in run.completed equals the run's ledger row for every streamed run: "
        f"{'yes' if matches else 'NO'}. (A streamed run's x-grifo-cost-micros header leaves "
        f"before any usage is known: edge {head_costs['edge']:.0f}, central "
        f"{head_costs['central']:.0f}.) One whole run (stream: false) each, cost in its "
        f"x-grifo-cost-micros header vs the ledger: {heads}.",
        f"Site API calls during the measured runs: {site_calls} (= {TOOL_CALLS} per run). New "
        f"TCP connections through the WAN proxies in the measured runs: tool path {tool_conns} "
        f"({connects:.1f} per central run), gateway->central {gw_conns} (pooled). WAN round "
        f"trips per central run, then: 1 (gateway<->point) + {TOOL_CALLS} tool requests + "
        f"{connects:.0f} tool connects = {trips:.0f} = {trips * args.rtt_ms:.0f} ms; measured "
        f"median difference central - edge "
        f"{stats['central']['median_ms'] - stats['edge']['median_ms']:.0f} ms.",
    ]
    text = report(stats, args, notes)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    record = {"args": vars(args), "argv": sys.argv, "work": str(work), "summary": stats,
              "runs": runs, "whole_runs": whole, "table": text}  # fmt: skip
    (out / f"agent_wan-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(record, indent=2)
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
