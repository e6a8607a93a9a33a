"""TTFT gain of the gateway's prefix affinity on the Mooncake conversation trace's shared
prefixes, scaled down to the packaged SmolLM2-135M.

One run starts a fresh `grifo serve` per mode with TWO local llama.cpp points (`parallel: 2`,
one thread each, pinned one to each CPU; same site, tier, jurisdiction and prices, so placement
is by load) and replays the same requests through it:

- prompts: each 512-token block (`hash_ids`) of a Mooncake request becomes `--block-tokens`
  words drawn from a fixed vocabulary of one-token words, seeded by the block's id (equal ids,
  equal text; the last, partial block gets its share of words); at most `--max-blocks` blocks
  per request. The first block (hash id 0, which opens every request of the trace: a shared
  system prompt) is the system message, the others the user message.
- answers: `max_tokens` = output_length / `--output-scale`, at least 4; greedy, seeded.
- workloads (`--workloads`): `turns` is every multi-turn conversation of the whole file (67
  requests, 33 conversations, 34 follow-up turns; tasks as in `grifo plan`: a turn continues the
  latest earlier request whose full blocks open its prompt), each turn sent the moment the
  previous turn's answer arrives, conversations taken in trace order by `--concurrency` client
  threads (a closed loop). `spaced`: the same requests in trace order, none waiting for another,
  so the requests between a turn and the next one in the trace come between them here too.
  `head`: the first `--requests` requests of the trace (none is a follow-up turn: the file's
  first is request 133, counting from 0), sent in trace order by the same threads. Arrival
  times are kept only as order.
- modes (`--modes`, fresh gateway and cold point caches for each run; repeats interleave):
  `off` (`prefix_affinity_chars: 0`), `on` (the key covers the system prompt and the first
  `--key-user-chars` characters of the user message: one key per conversation), `on-tight`
  (the same key with `affinity_slack_ms: 100` instead of the default 500: a conversation stays
  only where no other point has fewer requests queued or running), `on-sys` (the
  key covers the shared system prompt only, as the default 1024 characters does for the trace
  at full size, where block 0 is about 2,000 characters of text: one key for every request),
  `nocache` (affinity off and `engine.prefix_cache: false`: the floor).

Measured at the client, streaming with `stream_options.include_usage`: TTFT (to the first
content chunk), end-to-end latency, `usage.prompt_tokens_details.cached_tokens` against
`usage.prompt_tokens`, and the point from `x-grifo-point`. Prints a markdown table and writes
bench/results/prefix-affinity-<time>.json.

Usage: python bench/prefix_affinity.py [--workloads turns,spaced,head] [--requests 120]
       [--modes off,on,on-tight,on-sys,nocache,off,on,on-tight,on-sys,nocache]
       [--concurrency 4] [--block-tokens 8] [--max-blocks 32] [--output-scale 64]
       [--think-ms 0] [--health-interval 0.5]
The default (turns, ten runs) takes about 6 minutes on a 2-vCPU VM. PYTHONPATH=other/src runs
the gateway and points of another tree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import queue
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "tests" / "data" / "traces" / "mooncake_conversation_trace.jsonl"
RESULTS = ROOT / "bench" / "results"
KEY = "grf-prefix00-benchmark-key-not-secret"
MODEL = "smollm2-135m-instruct"
POINTS = ("point-a", "point-b")
PYTHONPATH = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "src")) if p)
# Words that SmolLM2's tokenizer encodes as one token each after a space: a block of n words is
# n tokens, so token counts follow the trace's.
WORDS = """time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy music market sense
nation plan college interest death experience effect use class control care field development
role effort rate heart drug show leader light voice wife police mind price report decision son
view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple
site project activity star table need court oil situation cost industry figure street image
phone data picture practice piece land product doctor wall patient worker news test movie north
love support technology step baby computer type attention film tree source organization hair
window evidence population river garden summer winter train bridge stone cloud island forest
mountain valley ocean desert village castle engine signal network memory""".split()  # noqa: SIM905
BLOCK = 512  # tokens per Mooncake block


@dataclass(frozen=True, slots=True)
class Req:
    index: int  # line in the trace
    blocks: tuple[int, ...]
    input_length: int
    output_length: int
    after: int | None  # the trace line this turn continues (`turns` only)


@dataclass(slots=True)
class Result:
    index: int
    ttft_ms: float = float("nan")
    latency_ms: float = float("nan")
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    point: str = "?"
    error: str = ""
    started: float = 0.0
    crowded: bool = False  # sent to a point with both slots busy while the other had one free


@dataclass(slots=True)
class Mode:
    name: str
    chars: int  # prefix_affinity_chars
    prefix_cache: bool = True
    slack_ms: float = 500.0  # affinity_slack_ms (the gateway's default)


@dataclass(slots=True)
class Run:
    workload: str
    mode: str
    chars: int
    wall_s: float
    results: list[Result] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after


# ---- the trace and the prompts -------------------------------------------------------------


def read_trace() -> list[dict[str, Any]]:
    with TRACE.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def workload(name: str, rows: list[dict[str, Any]], limit: int) -> list[list[Req]]:
    """Tasks (lists of dependent turns) in trace order."""
    sys.path.append(str(ROOT / "src"))  # after PYTHONPATH: another tree's src may come first
    from grifo.planner.trace import conversation_parents

    def req(i: int, after: int | None = None) -> Req:
        r = rows[i]
        return Req(i, tuple(r["hash_ids"]), r["input_length"], r["output_length"], after)

    if name == "head":
        return [[req(i)] for i in range(min(limit, len(rows)))]
    parents = conversation_parents(
        [tuple(r["hash_ids"]) for r in rows], [r["input_length"] for r in rows]
    )
    tasks: dict[int, list[Req]] = {}
    first: list[int] = []
    for i, parent in enumerate(parents):
        root = i if parent is None else first[parent]
        first.append(root)
        tasks.setdefault(root, []).append(req(i, parent))
    turns = [task for _, task in sorted(tasks.items()) if len(task) > 1]
    if name == "turns":
        return turns
    if name == "spaced":  # the same requests in trace order, none waiting for another
        return [[r] for r in sorted((r for task in turns for r in task), key=lambda r: r.index)]
    raise ValueError(f"unknown workload {name!r} (head, turns, spaced)")


def block_text(hash_id: int, words: int, seed: int) -> str:
    rng = random.Random(f"{seed}:{hash_id}")
    return "".join(" " + rng.choice(WORDS) for _ in range(max(1, words)))


def messages(r: Req, block_tokens: int, max_blocks: int, seed: int) -> list[dict[str, str]]:
    n = len(r.blocks)
    last = r.input_length - BLOCK * (n - 1)  # tokens in the last, partial block
    texts = []
    for k, hash_id in enumerate(r.blocks[:max_blocks]):
        words = block_tokens if k < n - 1 else round(block_tokens * min(last, BLOCK) / BLOCK)
        texts.append(block_text(hash_id, words, seed))
    system, user = texts[0].strip(), "".join(texts[1:]).strip()
    if not user:
        return [{"role": "user", "content": system}]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def max_tokens(r: Req, scale: float) -> int:
    return max(4, round(r.output_length / scale))


# ---- the fabric ----------------------------------------------------------------------------


def config(mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    engine = {
        "kind": "llama_cpp",
        "model": "smollm2",
        "threads": 1,
        "parallel": 2,
        "embeddings": "none",
        "prefix_cache": mode.prefix_cache,
        "context_length": args.context_length,
    }
    prices = {
        "usd_per_hour": 0.04,
        "default": {"input_usd_per_1m": 0.02, "output_usd_per_1m": 0.04},
    }
    where = {"site": "lima", "region": "sa-west", "jurisdiction": "PE", "tier": "edge"}
    return {
        "gateway": {
            "health_interval_s": args.health_interval,
            "placement": {
                "prefix_affinity_chars": mode.chars,
                "affinity_slack_ms": mode.slack_ms,
            },
            "audit": {"enabled": False},
        },
        "points": [
            {"name": name, **where, "rtt_ms": 5, "engine": engine, "prices": prices}
            for name in POINTS
        ],
        "tenants": [{"name": "bench"}],
        "keys": [{"id": "bench-1", "tenant": "bench", "env": "GRIFO_BENCH_KEY"}],
    }


class Gateway:
    """`grifo serve` in its own session with the mode's config; its points pinned one per CPU."""

    def __init__(self, work: Path, name: str, cfg: dict[str, Any]) -> None:
        path = work / f"{name}.json"  # JSON is YAML
        path.write_text(json.dumps(cfg, indent=1))
        self.log = (work / f"{name}.log").open("a")
        argv = [sys.executable, "-m", "grifo", "serve", "--config", str(path), "--port", "0"]
        self.proc = subprocess.Popen(
            [*argv, "--state-dir", str(work / f"state-{name}")],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, "GRIFO_BENCH_KEY": KEY},
            start_new_session=True,
        )
        try:
            self.url = self._banner().split()[-1].removesuffix("/v1")
            self._ready()
            self.pinned = self._pin_points()
        except BaseException:
            self.stop()
            raise

    def _banner(self, timeout_s: float = 240) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"grifo serve did not start (see {self.log.name})")
        return line

    def _ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        state: Any = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    state = json.loads(resp.read())
            except urllib.error.HTTPError as err:
                with err:
                    state = json.loads(err.read())
            except OSError:
                state = None
            if state and all(p["ready"] for p in state["points"].values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"points not ready: {state}")

    def _pin_points(self) -> dict[str, int]:
        """Every thread of each point process onto its own CPU (the VM has as many CPUs as
        points at best); the gateway and the client are left to the scheduler."""
        cpus = sorted(os.sched_getaffinity(0))
        pinned: dict[str, int] = {}
        for pid in children(self.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"point" not in argv:
                continue
            text = b" ".join(argv).decode(errors="replace")
            name = next((n for n in POINTS if f'"name":"{n}"' in text), None)
            if name is None:
                continue
            cpu = cpus[POINTS.index(name) % len(cpus)]
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {cpu})
            pinned[name] = cpu
        return pinned

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def children(pid: int) -> list[int]:
    """Descendants of `pid`, from /proc."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return found


# ---- the client ----------------------------------------------------------------------------


def one_request(
    conn: http.client.HTTPConnection, body: dict[str, Any], timeout_s: float, out: Result
) -> None:
    """One streamed chat completion, timed from writing the request."""
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    conn.timeout = timeout_s
    out.started = start = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    out.point = resp.getheader("x-grifo-point") or "?"
    if resp.status != 200:
        out.error = f"http {resp.status}: {resp.read()[:200]!r}"
        return
    buffer, done = b"", False
    while not done:
        piece = resp.read1(65536)
        if not piece:
            break
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue  # comments (the point's receipt)
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = f"in-band error: {chunk['error']}"
                    continue
                choices = chunk.get("choices") or []
                if out.ttft_ms != out.ttft_ms and any(
                    (c.get("delta") or {}).get("content") for c in choices
                ):
                    out.ttft_ms = 1000 * (time.monotonic() - start)
                usage = chunk.get("usage")
                if usage:
                    out.prompt_tokens = usage["prompt_tokens"]
                    out.completion_tokens = usage["completion_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens = details.get("cached_tokens") or 0
    out.latency_ms = 1000 * (time.monotonic() - start)
    resp.read()
    if not done and not out.error:
        out.error = "stream without [DONE]"


def replay(url: str, tasks: list[list[Req]], args: argparse.Namespace) -> list[Result]:
    """`--concurrency` threads take tasks in order; a task's turns go one after another."""
    todo: queue.SimpleQueue[list[Req]] = queue.SimpleQueue()
    for task in tasks:
        todo.put(task)
    results: list[Result] = []
    host, port = url.removeprefix("http://").split(":")

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=args.timeout)
        while True:
            try:
                task = todo.get_nowait()
            except queue.Empty:
                break
            for r in task:
                time.sleep(args.think_ms / 1000)
                body = {
                    "model": MODEL,
                    "messages": messages(r, args.block_tokens, args.max_blocks, args.seed),
                    "max_tokens": max_tokens(r, args.output_scale),
                    "temperature": 0,
                    "seed": args.seed,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                out = Result(r.index)
                try:
                    one_request(conn, body, args.timeout, out)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    out.error = f"{type(exc).__name__}: {exc}"
                if out.error:
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=args.timeout)
                results.append(out)
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # a timed join lets Ctrl-C through (and the gateway be stopped)
            t.join(0.5)
    mark_crowded(results)
    return sorted(results, key=lambda res: res.index)


def mark_crowded(results: list[Result], slots: int = 2) -> None:
    """Flag the requests that started while their point already had `slots` requests in
    flight and another point had fewer (seen from the client: a request is in flight from
    writing it to its last byte), i.e. that had to queue behind one when they need not."""
    spans = [(r.started, r.started + r.latency_ms / 1000, r.point) for r in results]
    for r in results:
        busy = Counter(p for a, b, p in spans if a < r.started < b)
        r.crowded = busy[r.point] >= slots and any(busy[p] < slots for p in POINTS)


# ---- the report ----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ranked = sorted(v for v in values if v == v)
    if not ranked:
        return float("nan")
    return ranked[min(len(ranked) - 1, round(q * (len(ranked) - 1)))]


def summary(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if not r.error]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50": pct([r.ttft_ms for r in ok], 0.5),
        "ttft_p90": pct([r.ttft_ms for r in ok], 0.9),
        "lat_p50": pct([r.latency_ms for r in ok], 0.5),
        "lat_p90": pct([r.latency_ms for r in ok], 0.9),
        "ttft_mean": statistics.fmean(r.ttft_ms for r in ok) if ok else float("nan"),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": cached / prompt if prompt else float("nan"),
        "points": dict(sorted(Counter(r.point for r in results).items())),
        "crowded": sum(r.crowded for r in ok),
    }


def row(label: str, s: dict[str, Any], wall_s: float | None = None) -> str:
    points = " / ".join(str(s["points"].get(p, 0)) for p in POINTS)
    wall = "" if wall_s is None else f"{wall_s:.0f}"
    return (
        f"| {label} | {s['requests']} | {s['errors']} | {s['ttft_p50']:,.0f} | "
        f"{s['ttft_p90']:,.0f} | {s['lat_p50']:,.0f} | {s['lat_p90']:,.0f} | "
        f"{100 * s['cached_share']:.1f}% ({s['cached_tokens']:,}/{s['prompt_tokens']:,}) | "
        f"{points} | {s['crowded']} | {wall} |"
    )


HEADER = (
    "| workload / mode (run) | requests | errors | TTFT p50 ms | TTFT p90 ms | latency p50 ms "
    "| latency p90 ms | cached / prompt tokens | requests on point-a / point-b | queued needlessly "
    "| wall s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def turn_stats(results: list[Result], previous: dict[int, int], slots: int = 2) -> Counter[str]:
    """Where one run's follow-up turns went: to their previous turn's point (a hit: it reused
    more than half of that turn's prompt; of the misses there, those that found the point full,
    `slots` others in flight when sent, so that a request waiting there took the slot holding
    the previous turn), or to the other point."""
    by_index = {r.index: r for r in results}
    spans = [(r.started, r.started + r.latency_ms / 1000, r.point, r.index) for r in results]
    out: Counter[str] = Counter()
    for index, before in previous.items():
        r, p = by_index.get(index), by_index.get(before)
        if r is None or p is None or r.error:
            continue
        if r.point != p.point:
            out["other point"] += 1
        elif r.cached_tokens > p.prompt_tokens / 2:
            out["same point, hit"] += 1
        else:
            busy = sum(1 for a, b, pt, i in spans if a < r.started < b and pt == r.point)
            out["same point, miss (it was full)" if busy >= slots else "same point, miss"] += 1
    return out


def followup_section(wl: str, later: dict[int, int], runs: list[Run]) -> list[str]:
    """The follow-up turns' own table, and where they went."""
    lines = [f"\n{wl}, follow-up turns only ({len(later)} per run):\n", HEADER]
    by: dict[str, list[Result]] = {}
    where: dict[str, Counter[str]] = {}
    for run in runs:
        if run.workload == wl:
            by.setdefault(run.mode, []).extend(r for r in run.results if r.index in later)
            where.setdefault(run.mode, Counter()).update(turn_stats(run.results, later))
    for mode, chosen in by.items():
        n = sum(1 for run in runs if run.workload == wl and run.mode == mode)
        lines.append(row(f"{wl} follow-ups / {mode} (x{n})", summary(chosen)))
    lines.append(f"\n{wl}, where the follow-up turns went (summed over runs):\n")
    kinds = ("same point, hit", "same point, miss", "same point, miss (it was full)", "other point")
    lines.append(f"| mode | {' | '.join(kinds)} |\n|---|{'---:|' * len(kinds)}")
    for mode, c in where.items():
        lines.append(f"| {mode} | {' | '.join(str(c[k]) for k in kinds)} |")
    return lines


def report(runs: list[Run], modes: dict[str, Mode], followups: dict[str, dict[int, int]]) -> str:
    lines = [HEADER]
    by: dict[tuple[str, str], list[Result]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for run in runs:
        counts[run.workload, run.mode] += 1
        n = counts[run.workload, run.mode]
        lines.append(row(f"{run.workload} / {run.mode} ({n})", summary(run.results), run.wall_s))
        by.setdefault((run.workload, run.mode), []).extend(run.results)
    lines.append("")
    lines.append("Pooled over the runs of each mode:")
    lines.append("")
    lines.append(HEADER)
    pooled = {key: summary(results) for key, results in by.items()}
    for (wl, mode), s in pooled.items():
        lines.append(row(f"{wl} / {mode} (x{counts[wl, mode]})", s))
    for wl in dict.fromkeys(w for w, _ in by):
        base = pooled.get((wl, "off"))
        if base is None:
            continue
        for mode in modes:
            m = pooled.get((wl, mode))
            if m is None or mode == "off":
                continue
            lines.append(
                f"\n{wl}: {mode}/off TTFT p50 x{m['ttft_p50'] / base['ttft_p50']:.2f}, "
                f"p90 x{m['ttft_p90'] / base['ttft_p90']:.2f}, mean "
                f"x{m['ttft_mean'] / base['ttft_mean']:.2f}; latency p50 "
                f"x{m['lat_p50'] / base['lat_p50']:.2f}, p90 x{m['lat_p90'] / base['lat_p90']:.2f}"
            )
        later = followups.get(wl)
        if later:  # the turns that have an earlier turn: where affinity can matter
            lines += followup_section(wl, later, runs)
    return "\n".join(lines)


def tree() -> str:
    """Which grifo code the fabric runs: the first src on PYTHONPATH, and its git commit."""
    src = next(p for p in PYTHONPATH.split(os.pathsep) if (Path(p) / "grifo").is_dir())
    done = subprocess.run(
        ["git", "-C", src, "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return f"{src} ({done.stdout.strip() or 'not a git tree'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="turns", help="turns, spaced, head")
    parser.add_argument("--requests", type=int, default=120, help="head: first N requests")
    parser.add_argument("--modes", default=",".join(["off,on,on-tight,on-sys,nocache"] * 2))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--block-tokens", type=int, default=8, help="words per 512-token block")
    parser.add_argument("--max-blocks", type=int, default=32)
    parser.add_argument("--output-scale", type=float, default=64.0)
    parser.add_argument("--key-user-chars", type=int, default=24)
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--think-ms", type=float, default=0.0, help="client pause before each request"
    )
    parser.add_argument(
        "--health-interval", type=float, default=0.5, help="gateway.health_interval_s"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    rows = read_trace()
    system_chars = len(block_text(rows[0]["hash_ids"][0], args.block_tokens, args.seed).strip())
    modes = {
        "off": Mode("off", 0),
        "on": Mode("on", system_chars + 1 + args.key_user_chars),
        "on-tight": Mode("on-tight", system_chars + 1 + args.key_user_chars, slack_ms=100),
        "on-sys": Mode("on-sys", system_chars),
        "nocache": Mode("nocache", 0, prefix_cache=False),
    }
    order = [m for m in args.modes.split(",") if m]
    unknown = [m for m in order if m not in modes]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(modes)}")
    loads = {wl: workload(wl, rows, args.requests) for wl in args.workloads.split(",") if wl}
    followups: dict[str, dict[int, int]] = {
        wl: {r.index: r.after for task in tasks for r in task if r.after is not None}
        for wl, tasks in loads.items()
    }
    work = Path(tempfile.mkdtemp(prefix="grifo-prefix-"))
    print(
        f"system prompt {system_chars} chars; on: prefix_affinity_chars "
        f"{modes['on'].chars}, on-sys: {modes['on-sys'].chars}; work directory {work}",
        flush=True,
    )
    runs: list[Run] = []
    for wl, tasks in loads.items():
        n = sum(len(t) for t in tasks)
        for k, mode_name in enumerate(order):
            mode = modes[mode_name]
            gateway = Gateway(work, f"{wl}-{mode_name}-{k}", config(mode, args))
            try:
                before = os.getloadavg()[0]
                began = time.monotonic()
                results = replay(gateway.url, tasks, args)
                wall = time.monotonic() - began
                run = Run(wl, mode_name, mode.chars, wall, results, (before, os.getloadavg()[0]))
            finally:
                gateway.stop()
            runs.append(run)
            s = summary(results)
            print(
                f"{wl} {mode_name}: {n} requests in {wall:.0f} s, pinned {gateway.pinned}, "
                f"load {run.load[0]:.2f}->{run.load[1]:.2f}\n{row(mode_name, s, wall)}",
                flush=True,
            )
    text = report(runs, modes, followups)
    print()
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = RESULTS / f"prefix-affinity-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "pythonpath": PYTHONPATH,
                "grifo": tree(),
                "modes": {k: dataclasses.asdict(m) for k, m in modes.items()},
                "runs": [
                    {
                        "workload": r.workload,
                        "mode": r.mode,
                        "prefix_affinity_chars": r.chars,
                        "wall_s": r.wall_s,
                        "load": r.load,
                        "summary": summary(r.results),
                        "results": [
                            {k: getattr(x, k) for k in Result.__slots__} for x in r.results
                        ],
                    }
                    for r in runs
                ],
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nraw numbers: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
