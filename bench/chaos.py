"""Success rate and tail latency under injected point failures, next to a no-fault baseline.

Every scenario gets a fresh `grifo serve` gateway whose topology has, in one jurisdiction (PE),
`--good` healthy points with the fake engine (`grifo point` processes, 2 ms per token) and, for
the fault scenarios, one `tests.support.faulty` point with a lower rtt_ms so placement prefers
it. `--concurrency` client threads send chat requests (alternately whole and streamed) for
`--seconds`. Scenarios: baseline (no faulty point), error500, hang, trickle (see
tests/support/faulty.py), kill (a healthy point is SIGKILLed halfway and restarted 2 s later);
on request also die (the faulty point's die_after_head).
A request succeeds on HTTP 200 with a whole JSON answer, or for a stream `data: [DONE]` and no
in-band error event, within `--timeout`. Prints a markdown table and writes
bench/results/chaos-<time>.json.

Usage: python bench/chaos.py [--seconds 10] [--concurrency 16] [--scenarios hang,kill]
       [--gateway-extra '{"dispatch": {"try_timeout_s": 1.0}}']
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

# ---- GATEWAY_EXTRA ------------------------------------------------------------------------
# Gateway options for the fault scenarios, merged into the `gateway:` section of every
# scenario's config (--gateway-extra is merged on top), e.g. {"dispatch": {"try_timeout_s":
# 1.0}}. Empty: the gateway's defaults (plus health_interval_s 0.5).
GATEWAY_EXTRA: dict[str, Any] = {}
# -------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
KEY = "grf-chaos000-benchmark-key-not-secret"
SCENARIOS = ("baseline", "error500", "hang", "trickle", "kill")  # the default run; also: die
FAULT_MODES = {"error500": "error", "hang": "hang", "trickle": "trickle", "die": "die_after_head"}
PROMPT = " ".join(f"w{i}" for i in range(16))
# The repo root (for tests.support.faulty) after any PYTHONPATH given, e.g. another tree's src.
PYTHONPATH = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
Proc = subprocess.Popen[str]


class Procs:
    """Every process this script starts, each in its own session; all stopped at the end."""

    def __init__(self, work: Path) -> None:
        self.work, self.live = work, list[Proc]()  # stdout piped: the first line says the port

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = (self.work / f"{name}.log").open("a")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.live.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.live[:]):
            self.stop(proc)


def first_line(proc: Proc, timeout_s: float = 60) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{proc.args!r} did not start (see its log in the work directory)")
    return line


def start_good(procs: Procs, name: str, port: int = 0) -> tuple[Proc, int]:
    config, key = procs.work / "points.json", procs.work / f"{name}.pem"
    argv = [sys.executable, "-m", "grifo", "point", "--config", str(config), "--name", name]
    proc = procs.start(name, [*argv, "--port", str(port), "--key-file", str(key)])
    return proc, int(json.loads(first_line(proc))["port"])


def start_faulty(procs: Procs, mode: str) -> tuple[Proc, int]:
    argv = [sys.executable, "-m", "tests.support.faulty", "--name", "bad-1", "--mode", mode]
    proc = procs.start("bad-1", [*argv, "--jurisdiction", "PE", "--port", "0"])
    return proc, int(json.loads(first_line(proc))["port"])


def point(name: str, rtt_ms: float, **extra: Any) -> dict[str, Any]:
    where = {"site": "lima", "region": "sa-west", "jurisdiction": "PE", "tier": "edge"}
    return {"name": name, **where, "rtt_ms": rtt_ms, **extra}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def start_gateway(
    procs: Procs, scenario: str, points: list[dict[str, Any]], extra: dict[str, Any]
) -> tuple[Proc, str]:
    config = {
        "gateway": merged({"health_interval_s": 0.5}, extra),
        "points": points,
        "tenants": [{"name": "bench", "allowed_jurisdictions": ["PE"]}],
        "keys": [{"id": "bench-1", "tenant": "bench", "env": "GRIFO_BENCH_KEY"}],
    }
    path = procs.work / f"gateway-{scenario}.json"  # JSON is YAML
    path.write_text(json.dumps(config, indent=1))
    argv = [sys.executable, "-m", "grifo", "serve", "--config", str(path), "--port", "0"]
    state = ["--state-dir", str(procs.work / f"state-{scenario}")]
    proc = procs.start(f"gateway-{scenario}", argv + state, {"GRIFO_BENCH_KEY": KEY})
    url = first_line(proc).split()[-1].removesuffix("/v1")  # the rest of the banner stays piped
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every point up, faulty ones included
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                state_now = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                state_now = json.loads(err.read())
        except OSError:
            state_now = {"points": {"?": {"ready": False}}}
        if all(p["ready"] for p in state_now["points"].values()):
            return proc, url
        time.sleep(0.1)
    raise RuntimeError(f"gateway points not ready: {state_now}")


def one_request(conn: http.client.HTTPConnection, stream: bool, timeout_s: float) -> str:
    """One chat request: "" on success, else why it failed."""
    body: dict[str, Any] = {
        "model": "fake-chat",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    deadline = time.monotonic() + timeout_s
    conn.timeout = timeout_s
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    sock = conn.sock  # the response keeps reading it even once `conn` lets it go
    assert sock is not None
    resp = conn.getresponse()
    data = b""
    while not resp.isclosed():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        piece = resp.read1(65536)
        if not piece:
            break
        data += piece
    data += resp.read()  # b"" that closes a response read to its length, ready for the next
    if resp.status != 200:
        return f"http {resp.status}"
    if not stream:
        return "" if json.loads(data).get("choices") else "no choices"
    events = [e.removeprefix(b"data: ") for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    if any(e.startswith(b"{") and b'"error"' in e and "error" in json.loads(e) for e in events):
        return "in-band error"
    return "" if events and events[-1] == b"[DONE]" else "stream without [DONE]"


def worker(
    index: int, url: str, until: float, timeout_s: float, out: list[tuple[float, float, str]]
) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    stream = index % 2 == 0
    while (start := time.monotonic()) < until:
        stream = not stream
        try:
            why = one_request(conn, stream, timeout_s)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            why = type(exc).__name__
        if why:
            conn.close()  # a fresh connection after any failure
            why = f"{'stream' if stream else 'whole'}: {why}"
        out.append((start, 1000 * (time.monotonic() - start), why))
    conn.close()


def pct(values: list[float], q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, int(q * len(ranked)))] if ranked else float("nan")


def run_scenario(
    procs: Procs, scenario: str, good: dict[str, tuple[Proc, int]], args: argparse.Namespace
) -> dict[str, Any]:
    points = [point(n, 20, url=f"http://127.0.0.1:{port}") for n, (_, port) in good.items()]
    faulty = None
    if scenario in FAULT_MODES:
        faulty, port = start_faulty(procs, FAULT_MODES[scenario])
        points.append(point("bad-1", 1, url=f"http://127.0.0.1:{port}"))
    gateway, url = start_gateway(procs, scenario, points, args.extra)
    results: list[tuple[float, float, str]] = []
    events: list[str] = []
    began = time.monotonic()
    until = began + args.seconds
    workers = [
        threading.Thread(target=worker, args=(i, url, until, args.timeout, results), daemon=True)
        for i in range(args.concurrency)
    ]
    for w in workers:
        w.start()
    if scenario == "kill":
        victim = next(iter(good))
        time.sleep(args.seconds / 2)
        procs.stop(good[victim][0], signal.SIGKILL)
        events.append(f"{time.monotonic() - began:.2f}s SIGKILL {victim}")
        time.sleep(2)
        good[victim] = start_good(procs, victim, good[victim][1])
        events.append(f"{time.monotonic() - began:.2f}s {victim} listening again")
    for w in workers:
        w.join()
    procs.stop(gateway)
    if faulty is not None:
        procs.stop(faulty)
    latencies = [ms for _, ms, _ in results]
    failures = Counter(why for _, _, why in results if why)
    failed_at = [round(at - began, 2) for at, _, why in results if why]
    return {
        "requests": len(results),
        "success_rate": 1 - sum(failures.values()) / max(1, len(results)),
        "ok_per_s": (len(results) - sum(failures.values())) / args.seconds,
        "p50_ms": pct(latencies, 0.50),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies, default=float("nan")),
        "failures": dict(failures.most_common()),
        "failed_sent_at_s": [min(failed_at), max(failed_at)] if failed_at else None,
        "events": events,
        "wall_s": time.monotonic() - began,
    }


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    base = results.get("baseline", {}).get("p99_ms")
    lines = [
        f"grifo chaos, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
        f"{args.seconds}s per scenario, c={args.concurrency}, {args.good} healthy points, "
        f"client timeout {args.timeout}s, gateway extra {json.dumps(args.extra)}",
        "",
        "| scenario | requests | success | ok/s | p50 ms | p99 ms | p99 / baseline | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        ratio = f"x{r['p99_ms'] / base:.1f}" if base else "-"
        fails = ", ".join(f"{k} {v}" for k, v in r["failures"].items()) or "-"
        lines.append(
            f"| {name} | {r['requests']} | {100 * r['success_rate']:.1f}% | {r['ok_per_s']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio} | {fails} |"
        )
    lines += [f"\n{name}: " + "; ".join(r["events"]) for name, r in results.items() if r["events"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--good", type=int, default=3, help="healthy fake points (at least 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="client timeout per request")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--gateway-extra", default="{}", help="JSON merged into `gateway:`")
    args = parser.parse_args()
    args.extra = merged(GATEWAY_EXTRA, json.loads(args.gateway_extra))
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - {*SCENARIOS, *FAULT_MODES}:
        sys.exit(f"unknown scenarios: {sorted(unknown)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` cleans up
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    work = Path(tempfile.mkdtemp(prefix="grifo-chaos-"))
    engine = {"kind": "fake", "embeddings": "fake", "token_delay_ms": 2}
    names = [f"good-{i}" for i in range(1, max(2, args.good) + 1)]
    (work / "points.json").write_text(
        json.dumps({"points": [point(n, 20, engine=engine) for n in names]})
    )
    procs = Procs(work)
    results: dict[str, dict[str, Any]] = {}
    try:
        good = {name: start_good(procs, name) for name in names}
        for scenario in scenarios:
            results[scenario] = run_scenario(procs, scenario, good, args)
            print(f"{scenario}: done", file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
        if results:  # also what finished before an error or Ctrl-C
            print(report(results, args))
            out = ROOT / "bench" / "results"
            out.mkdir(exist_ok=True)
            record = {"args": vars(args), "work": str(work), **results}
            stamp = time.strftime("%Y%m%d-%H%M%S")
            (out / f"chaos-{stamp}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
