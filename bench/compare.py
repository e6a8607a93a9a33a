"""Gateways side by side in one run: direct, nginx, grifo, vllm-router (Rust) and LiteLLM
proxy, same mock point; and grifo's HTTP layer alone (`bare_proxy.py`), the floor under grifo's
row. grifo runs twice: as configured by default (the `overhead.py` pipeline: key, policy,
placement, rate limit, ledger, metrics, audit log), and with the audit log off
(`grifo-audit-off`: the pipeline the performance targets name, which lists no audit log).

Each gateway runs alone on CPU 1 (`taskset`), started just before its tests and stopped after;
wrk, the mock point and the streaming client share CPU 0. Direct (wrk -> mock) is measured first
and last; gateway numbers are "added" over the mean of the two. LiteLLM and vllm-router are
installed on first use into bench/.litellm-venv and bench/.vllm-router-venv (bounded; if it
fails, the reason is printed in the row). Prints a markdown table and writes
bench/results/compare-<time>.json.

`--python-b PATH` adds both grifo rows again on another interpreter (a virtual environment
holding grifo's dependencies; this checkout's code runs on it), as `grifo-B` and
`grifo-audit-off-B`: two builds of Python side by side with the rest. `--compiled` adds them
again on the request path compiled with mypyc (`make compiled` first), as `grifo-compiled` and
`grifo-audit-off-compiled`; with `--python-b` too, also on that interpreter (`-B-compiled`).

Usage: python bench/compare.py [--seconds 10]
                               [--skip litellm,vllm-router,vllm-router-cache-aware,nginx,...]
                               [--python-b PATH] [--compiled]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from overhead import BODY, CONFIG, GATEWAY_PORT, KEY, LUA, MOCK_PORT, cpu_s

ROOT = Path(__file__).resolve().parent
LITELLM_VENV = ROOT / ".litellm-venv"
LITELLM_PINS = ("litellm[proxy]==1.108.*", "litellm[proxy]")
ROUTER_VENV = ROOT / ".vllm-router-venv"
ROUTER_PINS = ("vllm-router==0.1.17", "vllm-router")  # the Rust router the targets name
# Round-robin is the router at its cheapest (a plain pick, as grifo's one-point bench config
# needs); cache-aware, its default, keeps a prefix tree of every request's text.
ROUTER_POLICIES = (("vllm-router", "round_robin"), ("vllm-router-cache-aware", "cache_aware"))
MASTER_KEY = "sk-bench-master"
STREAMS = 32
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}).encode()
NGINX_CONF = """daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream mock {{ server 127.0.0.1:{mock}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
LITELLM_CONF = """model_list:
  - model_name: mock-chat
    litellm_params: {{model: openai/mock-chat, api_base: "http://127.0.0.1:{mock}/v1",
                      api_key: sk-mock}}
"""
# uvicorn's per-request access log off, as nginx's is: a log line per request is not the proxy.
LITELLM_LOG = json.dumps(
    {"version": 1, "disable_existing_loggers": False,
     "loggers": {"uvicorn.access": {"level": "WARNING"}}}
)  # fmt: skip

Result = dict[str, Any]


class Skip(Exception):
    """A gateway that cannot be installed or started; the message goes into the table."""


def sh(cmd: list[str], timeout_s: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kw)


Proc = subprocess.Popen[bytes]


def start(cmd: list[str], cpu: int, log: Path, env: dict[str, str] | None = None) -> Proc:
    """`cmd` pinned to `cpu`, in its own process group, output to `log`."""
    with log.open("wb") as out:
        cmd = ["taskset", "-c", str(cpu), *cmd]  # taskset execs: the pid is the command's
        return subprocess.Popen(cmd, stdout=out, stderr=out, env=env, start_new_session=True)


def stop(proc: Proc | None) -> None:
    """SIGTERM the process group, SIGKILL it after 10 s."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_ready(url: str, proc: Proc, log: Path, timeout_s: float) -> float:
    """Seconds until `url` answers 200; Skip if the process exits or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise Skip(f"exited {proc.returncode}: {log.read_text(errors='replace')[-300:]!r}")
        if sh(["curl", "-sf", "-o", "/dev/null", "-m", "1", url], 5).returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise Skip(f"not ready after {timeout_s:.0f} s")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(parents.get(out[-1], []))
    return out


def tree_cpu_s(pids: list[int]) -> float:
    return sum(cpu_s(p) for p in pids if Path(f"/proc/{p}").exists())


def rss_mib(pids: list[int]) -> float:
    total_kib = 0
    for p in pids:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text(), re.M)
        total_kib += int(m.group(1)) if m else 0
    return total_kib / 1024


def wrk(url: str, connections: int, seconds: int, script: Path) -> Result:
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    out = sh([*cmd, "-s", str(script), url], seconds + 30, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\b", out, re.M)
        assert m, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    def count(pattern: str) -> int:
        return sum(int(n) for m in re.finditer(pattern, out) for n in m.groups())

    return {
        "requests": count(r"(\d+) requests in"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non_2xx": count(r"Non-2xx or 3xx responses: (\d+)"),
        "socket_errors": count(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
    }


async def one_stream(port: int, auth: str) -> float:
    """One streaming chat completion on a new connection; seconds to the first content event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {auth}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(STREAM_BODY)}\r\nConnection: close\r\n\r\n"
        )
        t0 = time.perf_counter()
        writer.write(head.encode() + STREAM_BODY)
        status, *headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        if status.split()[1] != "200":
            raise RuntimeError(status)
        chunked = "transfer-encoding: chunked" in "\n".join(headers).lower()
        body, ttft = b"", 0.0
        while b"data: [DONE]" not in body:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                data = (await reader.readexactly(size + 2))[:-2] if size else b""
            else:
                data = await reader.read(65536)
            if not data:
                raise RuntimeError("stream ended before [DONE]")
            body += data
            if not ttft and re.search(rb'data: \{[^\n]*"content": ?"[^"]', body):
                ttft = time.perf_counter() - t0
        if not ttft:
            raise RuntimeError("no content event")
        return ttft
    finally:
        writer.close()


async def stream_load(port: int, auth: str, seconds: float, streams: int = STREAMS) -> Result:
    """`streams` concurrent streams, each worker starting a new one as soon as its last
    ended."""
    ttfts: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                ttfts.append(await asyncio.wait_for(one_stream(port, auth), 10))
            except Exception as exc:  # any failed stream is counted, whatever the cause
                errors.append(repr(exc)[:120])

    await asyncio.gather(*(worker() for _ in range(streams)))
    ms = sorted(1000 * t for t in ttfts)
    return {
        "completed": len(ttfts),
        "errors": len(errors),
        "first_errors": errors[:3],
        "ttft_p50_ms": statistics.median(ms) if ms else None,
        "ttft_p99_ms": ms[int(0.99 * (len(ms) - 1))] if ms else None,
    }


def measure(port: int, auth: str, pids: list[int], seconds: int, work: Path) -> Result:
    """wrk at c=1 and c=64, then streams; `pids` is the gateway tree (empty for direct)."""
    script = work / f"post-{port}.lua"
    script.write_text(LUA.replace(KEY, auth))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    wrk(url, 8, 2, script)  # warm-up
    result: Result = {"c1": wrk(url, 1, seconds, script)}
    before = tree_cpu_s(pids)
    result["c64"] = wrk(url, 64, seconds, script)
    if pids:  # a saturated gateway with a share well under 1.0 had to share CPU 1
        spent = tree_cpu_s(pids) - before
        result["cpu_ms_per_req"] = 1000 * spent / result["c64"]["requests"]
        result["cpu_share_c64"] = spent / seconds
    result["stream"] = uvloop.run(stream_load(port, auth, seconds))
    return result


def ensure_venv(venv: Path, pins: tuple[str, ...], dist: str, timeout_s: float = 300) -> Result:
    """Install the first of `pins` that pip can into `venv` unless `dist` is there already (a
    gateway in its own virtual environment); its version and the install time."""
    py, t0, reasons = venv / "bin" / "python", time.monotonic(), []
    if not (venv / "bin" / dist).exists():
        try:
            sh(["python3", "-m", "venv", str(venv)], 60, check=True)
            for spec in pins:
                left = max(1.0, timeout_s - (time.monotonic() - t0))
                done = sh([str(py), "-m", "pip", "install", "-q", spec], left)
                if done.returncode == 0:
                    break
                reasons.append(f"{spec}: {done.stderr.strip()[-200:]}")
            else:
                raise Skip("pip install failed: " + " | ".join(reasons))
        except subprocess.TimeoutExpired as exc:
            raise Skip(f"install did not finish in {timeout_s:.0f} s") from exc
        except subprocess.CalledProcessError as exc:
            raise Skip(f"venv creation failed: {exc.stderr}") from exc
    installed_s = time.monotonic() - t0
    version = sh([str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"], 60)
    if version.returncode != 0:
        raise Skip(f"{dist} not importable: {version.stderr.strip()[-200:]}")
    return {"version": version.stdout.strip(), "install_s": round(installed_s, 1)}


def ensure_nginx() -> Result:
    if shutil.which("nginx") is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            sh(["apt-get", "install", "-y", "nginx"], 300)
        if shutil.which("nginx") is None:
            raise Skip("nginx missing and `apt-get install -y nginx` did not provide it")
    return {"version": sh(["nginx", "-v"], 10).stderr.strip()}


@dataclass
class Gateway:
    """How to start one gateway in its own directory `work/name`."""

    name: str
    port: int
    auth: str  # bearer token it accepts
    ready_path: str
    start_timeout_s: float
    cmd: str  # split on spaces; temp paths have none
    files: dict[str, str] = field(default_factory=dict)  # written into its directory first
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], Result] = dict  # installs it if needed; returns facts for the results
    whole_tree: bool = True  # RSS/CPU of children too (nginx workers)


def gateways(args: argparse.Namespace, work: Path) -> list[Gateway]:
    mock, n, lt = args.mock_port, work / "nginx", work / "litellm"
    grifo_yaml = CONFIG.replace(f"port: {GATEWAY_PORT}", f"port: {args.grifo_port}")
    grifo_yaml = grifo_yaml.replace(f"127.0.0.1:{MOCK_PORT}", f"127.0.0.1:{mock}")
    unaudited = grifo_yaml.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    litellm_env = {"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    interpreters: list[tuple[str, str, dict[str, str]]] = [(sys.executable, "", {})]
    if args.python_b:  # this checkout's code on the other interpreter
        interpreters.append((args.python_b, "-B", {"PYTHONPATH": str(ROOT.parent / "src")}))
    if args.compiled:  # this checkout's code, compiled by `make compiled`
        interpreters.append((sys.executable, "-compiled", {"PYTHONPATH": str(COMPILED)}))
        if args.python_b:  # the same extension modules: one CPython ABI for all 3.11 builds
            interpreters.append((args.python_b, "-B-compiled", {"PYTHONPATH": str(COMPILED)}))
    grifos = [  # each row next to its twin on the other interpreter: measured minutes apart
        (f"{base}{suffix}", python, {"GRIFO_BENCH_KEY": KEY, **env})
        for base in ("grifo", "grifo-audit-off")
        for python, suffix, env in interpreters
    ]
    return [
        Gateway("nginx", args.nginx_port, "none", "/health", 30,
                f"nginx -p {n} -c {n}/nginx.conf -e {n}/error.log",
                {"nginx.conf": NGINX_CONF.format(d=n, mock=mock, port=args.nginx_port)},
                prepare=ensure_nginx),
        Gateway("grifo-http", args.grifo_http_port, "none", "/health", 30,
                f"{sys.executable} {ROOT / 'bare_proxy.py'} {args.grifo_http_port} {mock}",
                whole_tree=False),
        *(Gateway(name, args.grifo_port, KEY, "/readyz", 60,
                  f"{python} -m grifo serve --config {work / name}/bench.yaml "
                  f"--state-dir {work / name}/state",
                  {"bench.yaml": unaudited if "audit-off" in name else grifo_yaml}, env,
                  whole_tree=False)
          for name, python, env in grifos),
        *(Gateway(name, args.vllm_router_port, "none", "/health", 60,
                  f"{ROUTER_VENV}/bin/vllm-router --worker-urls http://127.0.0.1:{mock} "
                  f"--host 127.0.0.1 --port {args.vllm_router_port} --log-level warning "
                  f"--prometheus-port {args.vllm_router_metrics_port} --policy {policy}",
                  prepare=lambda: ensure_venv(ROUTER_VENV, ROUTER_PINS, "vllm-router"))
          for name, policy in ROUTER_POLICIES),
        Gateway("litellm", args.litellm_port, MASTER_KEY, "/health/liveliness", 120,
                f"{LITELLM_VENV}/bin/litellm --config {lt}/litellm.yaml --host 127.0.0.1 "
                f"--port {args.litellm_port} --num_workers 1 --log_config {lt}/log.json",
                {"litellm.yaml": LITELLM_CONF.format(mock=mock), "log.json": LITELLM_LOG},
                litellm_env, prepare=lambda: ensure_venv(LITELLM_VENV, LITELLM_PINS, "litellm")),
    ]  # fmt: skip


COMPILED = ROOT.parent / "build" / "compiled" / "src"  # `make compiled`


def compiled_build_problem() -> str | None:
    """Why the compiled build cannot stand for this checkout's code, if it cannot."""
    built = COMPILED.parent / "mypyc.log"
    if not built.is_file():
        return f"no compiled build at {COMPILED}: run `make compiled` first"
    changed = [
        path
        for path in (ROOT.parent / "src" / "grifo").rglob("*.py")
        if path.stat().st_mtime > built.stat().st_mtime
    ]
    if changed:
        return f"the compiled build is older than {changed[0]}: run `make compiled` again"
    return None


def run_gateway(gw: Gateway, seconds: int, work: Path) -> Result:
    """Start one gateway, read its idle RSS, measure it, stop it. A Skip becomes {"skipped"}."""
    proc, d = None, work / gw.name
    try:
        info = gw.prepare()
        if not port_free(gw.port):
            raise Skip(f"port {gw.port} is already in use")
        d.mkdir()
        for name, text in gw.files.items():
            (d / name).write_text(text)
        proc = start(gw.cmd.split(), 1, d / "log", {**os.environ, **gw.env})
        url = f"http://127.0.0.1:{gw.port}{gw.ready_path}"
        info["ready_s"] = round(wait_ready(url, proc, d / "log", gw.start_timeout_s), 1)
        time.sleep(1)  # let start-up work settle before the idle reading
        pids = tree(proc.pid) if gw.whole_tree else [proc.pid]
        info |= {"idle_rss_mib": rss_mib(pids), "processes": len(pids)}
        return {**info, **measure(gw.port, gw.auth, pids, seconds, work)}
    except (Skip, subprocess.SubprocessError, OSError) as exc:
        return {"skipped": re.sub(r"[|\s]+", " ", str(exc))[:300]}  # one table cell
    finally:
        stop(proc)


def machine() -> str:
    model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return f"{os.cpu_count()} vCPU, {model.group(1) if model else 'unknown CPU'}"


def baseline(first: Result, last: Result) -> Result:
    """Mean of the two direct runs, and how far apart they were."""
    runs = (first, last)
    values = {
        "p50": [r["c1"]["p50_ms"] for r in runs],
        "p99": [r["c1"]["p99_ms"] for r in runs],
        "rps": [r["c64"]["rps"] for r in runs],
        "p99_64": [r["c64"]["p99_ms"] for r in runs],
        "ttft": [r["stream"]["ttft_p50_ms"] or 0.0 for r in runs],
    }
    base: Result = {k: statistics.mean(v) for k, v in values.items()}
    base["spread"] = {k: max(v) - min(v) for k, v in values.items()}
    return base


def row(name: str, r: Result, base: Result) -> str:
    if "skipped" in r:
        return f"| {name} | not run: {r['skipped']} |" + " |" * 8
    c1, c64, st = r["c1"], r["c64"], r["stream"]
    errors = (
        f"{c1['non_2xx'] + c64['non_2xx']} / {c1['socket_errors'] + c64['socket_errors']}"
        f" / {st['errors']}"
    )
    ttft = st["ttft_p50_ms"]
    if "cpu_ms_per_req" not in r:  # a direct run: absolute values, in brackets
        return (
            f"| {name} | [{c1['p50_ms']:.3f}] | [{c1['p99_ms']:.3f}] | {c64['rps']:,.0f} | "
            f"{c64['rps'] / base['rps']:.3g} | [{c64['p99_ms']:.2f}] | [{ttft or 0:.2f}] | "
            f"| | {errors} |"
        )
    added_ttft = "n/a" if ttft is None else f"{ttft - base['ttft']:+.2f}"
    return (
        f"| {name} | {c1['p50_ms'] - base['p50']:+.3f} | {c1['p99_ms'] - base['p99']:+.3f} | "
        f"{c64['rps']:,.0f} | {c64['rps'] / base['rps']:.3g} | "
        f"{c64['p99_ms'] - base['p99_64']:+.2f} | {added_ttft} | "
        f"{r['cpu_ms_per_req']:.3f} | {r['idle_rss_mib']:.1f} | {errors} |"
    )


def report(results: dict[str, Result], seconds: int, load: list[float]) -> str:
    base = baseline(results["direct (start)"], results["direct (end)"])
    spread = base["spread"]
    return "\n".join(
        [
            f"Gateways compared, {time.strftime('%Y-%m-%d %H:%M %Z')}, {machine()}, "
            f"{seconds} s per test; gateway alone on CPU 1, wrk + mock + stream client on CPU 0; "
            f"1-min load average {load[0]:.2f} at start, {load[1]:.2f} at end",
            "",
            "| gateway | added p50 c=1 (ms) | added p99 c=1 | req/s c=64 | ratio vs direct | "
            f"added p99 c=64 | stream TTFT added p50 ({STREAMS} streams) | CPU ms/req | "
            "idle RSS MiB | errors (non-2xx / socket / stream) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(row(name, r, base) for name, r in results.items()),
            "",
            "Direct rows show absolute values in [ ]; gateway rows are gateway minus the mean of "
            f"the two direct runs (spread between them: p50 c=1 {spread['p50']:.3f} ms, p99 c=1 "
            f"{spread['p99']:.3f} ms, req/s c=64 {spread['rps']:,.0f}, p99 c=64 "
            f"{spread['p99_64']:.2f} ms, TTFT p50 {spread['ttft']:.2f} ms).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per test (default 10)")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated: nginx,grifo-http,grifo,grifo-audit-off,vllm-router,"
        "vllm-router-cache-aware,litellm",
    )
    parser.add_argument("--python-b", help="also run both grifo rows on this interpreter")
    parser.add_argument(
        "--compiled", action="store_true", help="also run both grifo rows compiled (make compiled)"
    )
    ports = (
        ("mock", 18901),
        ("grifo", 18900),
        ("nginx", 18902),
        ("litellm", 18903),
        ("grifo-http", 18904),
        ("vllm-router", 18905),
        ("vllm-router-metrics", 18906),
    )
    for name, port in ports:
        parser.add_argument(f"--{name}-port", type=int, default=port)
    args = parser.parse_args()
    if args.compiled and (problem := compiled_build_problem()):
        sys.exit(problem)
    for tool in ("wrk", "taskset", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install {tool}")
    os.sched_setaffinity(0, {0})  # the streaming client shares CPU 0 with wrk and the mock
    if not port_free(args.mock_port):
        sys.exit(f"port {args.mock_port} (mock) is already in use")
    work = Path(tempfile.mkdtemp(prefix="grifo-compare-"))
    mock = start(
        [sys.executable, str(ROOT / "mock_point.py"), str(args.mock_port)], 0, work / "mock.log"
    )
    results: dict[str, Result] = {}
    load = [os.getloadavg()[0]]  # other work on the machine shows here
    try:
        wait_ready(f"http://127.0.0.1:{args.mock_port}/health", mock, work / "mock.log", 30)
        results["direct (start)"] = measure(args.mock_port, KEY, [], args.seconds, work)
        for gw in gateways(args, work):
            if gw.name not in args.skip.split(","):
                print(f"measuring {gw.name}...", file=sys.stderr, flush=True)
                results[gw.name] = run_gateway(gw, args.seconds, work)
        results["direct (end)"] = measure(args.mock_port, KEY, [], args.seconds, work)
    finally:
        stop(mock)
    load.append(os.getloadavg()[0])
    table = report(results, args.seconds, load)
    if args.python_b:
        table += f"\nA: {sys.executable} (Python {platform.python_version()}); B: {args.python_b}"
        version = sh([args.python_b, "-c", "import platform; print(platform.python_version())"], 30)
        table += f" (Python {version.stdout.strip() or 'unknown'})."
    print(table)
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    raw = {"machine": machine(), "seconds": args.seconds, "load": load, "table": table}
    raw["results"] = results
    (out / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(raw, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
