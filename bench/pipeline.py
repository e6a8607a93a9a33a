"""The gateway's pipeline alone: CPU per request with no socket between client, gateway and
point, for two source trees side by side.

`overhead.py` and `ab.py` measure the whole gateway under wrk, where this VM's drift
(bench/README.md) hides changes of a few percent. Here `GatewayApp.handle` is called directly
with requests built in memory, 64 at a time (`asyncio.gather`), and the point's connection pool
answers every POST at once with the mock point's canned completion (its health checks still go
to `mock_point.py` over HTTP): what is left is the pipeline of `service.py` (key, policy,
placement, admission, dispatch, metering to the ledger, audit record and attestation,
metrics). Each tree runs in a process of its own, started afresh every round; the trees take
turns, and the result is the median over rounds of B over A. `loop` is the event loop's thread
alone (`time.thread_time`); `all` adds the ledger's and the audit log's writer threads.

With `--stream` every request asks for a stream and the pool answers with the mock point's 22
SSE events (a role and content chunk, 18 content chunks, the last with its finish reason, the
usage chunk and `[DONE]`), each its own read, fed one loop turn apart; the measure is per
stream, its body read to the end as the HTTP server would and then closed.

With `--instructions` each tree's child runs under valgrind (callgrind) instead, twice: with
`INSTRUCTION_BATCHES` batches after the warm-up and with twice as many, and the difference over
the extra requests is the user-space instructions per request (or stream), threads included.
Counts move by well under 1% between runs where this VM's timings move by 10-30% (both trees'
timers still tick on wall time, a little more under valgrind's slowdown): the way to compare
changes of a few percent here. Instructions are not time (cache misses, system calls' kernel
work): confirm a change that counts fewer with the timed mode before calling it faster.

With `--bytecodes` each tree's child counts, instead of timing, the bytecode instructions the
interpreter runs per request on the event loop's thread (`sys.settrace` with opcode events,
over `BYTECODE_BATCHES` batches after the warm-up), in all and per function: the same count in
every run of the same tree, in seconds rather than valgrind's minutes, and it says which
functions a change made shorter. Bytecodes are not time either (a call into C counts one), so
a change is still confirmed in the timed mode.

Usage: python bench/pipeline.py A [B] [--rounds 10] [--audit on|off] [--body-kb 0] [--stream]
       python bench/pipeline.py A [B] --instructions [--rounds 1]   (needs valgrind)
       python bench/pipeline.py A [B] --bytecodes [--rounds 1]
       python bench/pipeline.py A --pieces   (what some stages cost alone, called in a loop)

A and B as in `ab.py`: git revisions or directories holding `src/grifo` (B defaults to the
working tree); both run on this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from overhead import start_mock

ROOT = Path(__file__).resolve().parent.parent
BATCH, BATCHES, REPEATS = 64, 100, 9  # per measure: 6,400 requests; the median of 9 measures
INSTRUCTION_BATCHES = 10  # under valgrind (~50x slower): 640 requests, then 1,280
BYTECODE_BATCHES = 10  # traced: 640 requests


def chat_body(kb: int) -> bytes:
    """`overhead.py`'s request, or a conversation of about `kb` KiB (an agent's context)."""
    from overhead import BODY

    if kb <= 0:
        return BODY.encode()
    turn = "The quick brown fox jumps over the lazy dog. " * 20
    messages: list[dict[str, str]] = []
    while sum(len(m["content"]) for m in messages) < kb * 1024:
        role = "user" if len(messages) % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"{turn}(turn {len(messages)})"})
    return json.dumps({"model": "mock-chat", "messages": messages, "max_tokens": 64}).encode()


def stream_events() -> list[bytes]:
    """The SSE events of `mock_point.py`'s streamed answer, one per read."""
    import mock_point

    middle = [mock_point.MIDDLE] * (mock_point.STREAM_CHUNKS - 2)
    return [mock_point.FIRST, *middle, mock_point.LAST, mock_point.USAGE, mock_point.DONE]


def answering(over_http: Any, stream: bool) -> Any:
    """The point's pool `request`, answering every POST without a socket: the mock point's
    whole answer, or its stream's events fed one per loop turn (as reads would come); health
    and load checks still go to `mock_point.py` over HTTP."""
    import mock_point

    from grifo.http.upstream import UpstreamResponse

    identity = {name.lower(): value for name, value in mock_point.IDENT}
    events = stream_events()

    async def request(method: str, path: str, **kwargs: Any) -> UpstreamResponse:
        if method != "POST":
            result: UpstreamResponse = await over_http(method, path, **kwargs)
            return result
        answer = UpstreamResponse(None)  # type: ignore[arg-type]
        answer.status, answer.headers = 200, dict(identity)
        await asyncio.sleep(0)  # a point answers in a later turn of the loop
        if not stream:
            answer._feed(mock_point.CHAT)
            answer._finish()
            return answer
        loop = asyncio.get_running_loop()

        def feed(i: int) -> None:
            if i == len(events):
                answer._finish()
            else:
                answer._feed(events[i])
                loop.call_soon(feed, i + 1)

        feed(0)
        return answer

    return request


async def child(
    audit: str, pieces: bool, body_kb: int, stream: bool, batches: int = 0, bytecodes: bool = False
) -> dict[str, Any]:
    """In a process running one tree: the pipeline's CPU per request (microseconds); with
    `batches`, a short warm-up and that many batches once, for valgrind to count; with
    `bytecodes`, the bytecodes per request (`counted`)."""
    import uvloop  # noqa: F401  (grifo's loop; imported as `grifo serve` does)
    from overhead import CONFIG, KEY

    from grifo import lifecycle, serve
    from grifo.api.app import GatewayApp
    from grifo.config.load import load_config
    from grifo.http.message import Request, StreamResponse

    body = chat_body(body_kb)
    if stream:
        body = json.dumps({**json.loads(body), "stream": True}).encode()
    work = Path(tempfile.mkdtemp(prefix="grifo-pipeline-"))
    config = CONFIG
    if audit == "off":
        config = config.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    (work / "bench.yaml").write_text(config)
    os.environ["GRIFO_BENCH_KEY"] = KEY
    running = await serve.start(load_config(work / "bench.yaml"), work / "state", "127.0.0.1", 0)
    pool = running.gateway.pools["mock"]
    pool.request = answering(pool.request, stream)  # type: ignore[method-assign]
    app = GatewayApp(running.gateway)
    headers = {
        b"host": b"127.0.0.1",
        b"authorization": f"Bearer {KEY}".encode(),
        b"content-type": b"application/json",
        b"content-length": str(len(body)).encode(),
    }

    async def one() -> int:
        response = await app.handle(
            Request("POST", "/v1/chat/completions", "", dict(headers), body)
        )
        if isinstance(response, StreamResponse):
            await drain(response)
        return response.status

    async def batch() -> None:
        statuses = await asyncio.gather(*(one() for _ in range(BATCH)))
        failed = [status for status in statuses if status != 200]
        assert not failed, failed

    for _ in range(INSTRUCTION_BATCHES if batches else BATCHES // 2):
        await batch()
    lifecycle._settle_heap()  # as `grifo serve` does once started
    result: dict[str, Any] = {}
    if bytecodes:
        result = await counted(batch, BYTECODE_BATCHES)
    elif batches:
        for _ in range(batches):
            await batch()
    elif pieces:
        stage_costs(running.gateway, body)
    else:
        result = await timed(batch)
    await running.stop(0.5)
    return result


async def drain(response: Any) -> None:
    """A stream read to its end and closed as the HTTP server does: piped where it can be (a
    tree from before `StreamResponse.pipe` has only the body to iterate)."""
    pipe = getattr(response, "pipe", None)
    if pipe is not None:
        await pipe(_Sink())
    else:
        async for _ in response.body:
            pass
    if response.on_close is not None:
        await response.on_close(True)


class _Sink:
    """A client connection that takes a piped body and drops it (`http.message.ChunkSink`)."""

    closing = False

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def send_chunk(self, chunk: bytes) -> None:
        pass


async def timed(batch: Callable[[], Awaitable[None]]) -> dict[str, float]:
    """CPU per request over `REPEATS` measures of `BATCHES` batches: medians, microseconds."""
    loop_us, all_us = [], []
    for _ in range(REPEATS):
        thread, process = time.thread_time(), time.process_time()
        for _ in range(BATCHES):
            await batch()
        requests = BATCH * BATCHES
        loop_us.append((time.thread_time() - thread) / requests * 1e6)
        all_us.append((time.process_time() - process) / requests * 1e6)
    return {"loop": statistics.median(loop_us), "all": statistics.median(all_us)}


async def counted(batch: Callable[[], Awaitable[None]], batches: int) -> dict[str, Any]:
    """Bytecodes run on this thread per request over `batches` batches: in all, and per
    function ("path:line name", this tree's part of the path dropped)."""
    by_code: dict[Any, int] = {}

    def opcodes(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            by_code[frame.f_code] = by_code.get(frame.f_code, 0) + 1
        return opcodes

    def calls(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return opcodes

    sys.settrace(calls)
    try:
        for _ in range(batches):
            await batch()
    finally:
        sys.settrace(None)
    requests = batches * BATCH
    functions: dict[str, float] = {}
    for code, count in by_code.items():
        where = re.sub(r"^.*?/(src/grifo|bench|lib/python3[.\d]*)/", r"\1/", code.co_filename)
        name = f"{where}:{code.co_firstlineno} {code.co_qualname}"
        functions[name] = functions.get(name, 0) + count / requests
    return {"bytecodes": sum(functions.values()), "functions": functions}


def stage_costs(gateway: Any, raw: bytes) -> None:
    """What some stages of a request cost alone, called in a loop (best of 5, microseconds):
    where the pipeline's time goes, in pieces."""
    import timeit

    import mock_point
    from overhead import KEY

    from grifo.exchange import Exchange
    from grifo.metering.usage import usage_of
    from grifo.store.records import LedgerEntry
    from grifo.wire import requests as wire

    point = gateway.points[0]
    principal = gateway.keys.authenticate(f"Bearer {KEY}".encode())
    body = wire.decode_for("/v1/chat/completions", raw)
    ex = Exchange("req-1", "/v1/chat/completions", time.monotonic_ns(), principal, "mock-chat")
    ex.point, ex.body, ex.answer = point, raw, mock_point.CHAT
    entry = LedgerEntry(
        "req-1", 0, "bench", "bench-1", "/v1/chat/completions", "mock-chat", "mock", "PE",
        16, 64, 5, "ok", "point", 0.5,
    )  # fmt: skip
    chat = "/v1/chat/completions"

    def metrics() -> None:
        gateway.metrics.observe(chat, "mock", "mock-chat", 200, (0.001, None), 64)
        gateway.metrics.meter("bench", "bench-1", "mock", "mock-chat", (16, 64), 5)

    stages: list[tuple[str, Any, int]] = [
        ("key lookup", lambda: gateway.keys.authenticate(f"Bearer {KEY}".encode()), 20_000),
        ("body decoded, duplicate keys refused", lambda: wire.decode_for(chat, raw), 20_000),
        ("placement", lambda: gateway._place(body, None, 64, None, None), 20_000),
        ("usage read from the answer", lambda: usage_of(mock_point.CHAT), 20_000),
        ("metrics (answer and meter)", metrics, 20_000),
        ("ledger entry to spool and queue", lambda: gateway.ledger.record(entry), 5_000),
    ]
    audit = gateway.audit
    if audit is not None:
        usage = (ex, point, (16, 64), "ok", 5)
        record = audit.append(*usage)
        claims = [msgspec_encode(audit.claims(record))] * 8
        attester = gateway.answers.attester
        stages += [
            ("audit record (HMACs, chain, spool)", lambda: audit.append(*usage), 5_000),
            ("attestation of an answer alone", lambda: attester._tokens(claims[:1]), 2_000),
            ("attestations of 8 answers, per answer", lambda: attester._tokens(claims), 250),
        ]
    for name, call, number in stages:
        per_call = min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6
        if name.endswith("per answer"):
            per_call /= 8
        print(f"| {name} | {per_call:.2f} |")


def msgspec_encode(value: Any) -> bytes:
    import msgspec

    return msgspec.json.encode(value)


def run_tree(
    tree: Path,
    audit: str,
    seed: int,
    body_kb: int,
    stream: bool,
    instructions: bool = False,
    bytecodes: bool = False,
) -> dict[str, Any]:
    """One measure of `tree` in a new process; `seed` fixes its string hashing (dictionary
    layouts move timings by several percent between processes), the same for A and B.
    `instructions`: {"instructions": per request}, from two counted runs (module doc)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(ROOT / "bench")]),
        "PYTHONHASHSEED": str(seed),
    }
    command = [
        *(sys.executable, __file__, "--child", "--audit", audit, "--body-kb", str(body_kb)),
        *(["--stream"] if stream else []),
        *(["--bytecodes"] if bytecodes else []),
    ]
    if not instructions:
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    counts = []
    for batches in (INSTRUCTION_BATCHES, 2 * INSTRUCTION_BATCHES):
        counted = subprocess.run(
            [
                *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
                *(*command, "--batches", str(batches)),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        found = re.search(r"Collected : (\d+)", counted)
        assert found, counted[-2000:]
        counts.append(int(found.group(1)))
    return {"instructions": (counts[1] - counts[0]) / (INSTRUCTION_BATCHES * BATCH)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", nargs="?")
    parser.add_argument("b", nargs="?", default=str(ROOT), help="default: the working tree")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--audit", choices=["on", "off"], default="on")
    parser.add_argument("--body-kb", type=int, default=0, help="chat bodies of this size")
    parser.add_argument("--pieces", action="store_true", help="time stages of one tree (A)")
    parser.add_argument("--stream", action="store_true", help="streamed answers, per stream")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under valgrind"
    )
    parser.add_argument(
        "--bytecodes", action="store_true", help="count bytecodes per request and function"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        result = uvloop.run(
            child(args.audit, args.pieces, args.body_kb, args.stream, args.batches, args.bytecodes)
        )
        if not args.pieces and not args.batches:
            print(json.dumps(result))
        return
    if args.instructions and shutil.which("valgrind") is None:
        sys.exit("valgrind is missing: apt-get install valgrind")
    if args.a is None:
        parser.error("give the revision or tree to compare with")
    from ab import checkouts

    work = Path(tempfile.mkdtemp(prefix="grifo-pipeline-"))
    with checkouts(args.a, args.b, work) as trees:
        if args.pieces:
            pieces(trees["A"], args.audit, args.body_kb)
            return
        mock = start_mock()
        results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        try:
            for round_ in range(args.rounds):
                for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                    result = run_tree(
                        trees[name],
                        args.audit,
                        round_,
                        args.body_kb,
                        args.stream,
                        args.instructions,
                        args.bytecodes,
                    )
                    results[name].append(result)
        finally:
            mock.send_signal(signal.SIGTERM)
            mock.wait(timeout=10)
    report(args, results)


def pieces(tree: Path, audit: str, body_kb: int) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(ROOT / "bench")]),
        "PYTHONHASHSEED": "0",
    }
    mock = start_mock()
    try:
        print(
            f"stages of a request alone, audit {audit}, body {len(chat_body(body_kb)):,} bytes, "
            f"{time.strftime('%Y-%m-%d %H:%M')}"
        )
        print()
        print("| stage | us per call |")
        print("|---|---:|")
        sys.stdout.flush()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--pieces",
                "--audit",
                audit,
                "--body-kb",
                str(body_kb),
            ],
            env=env,
            check=True,
        )
    finally:
        mock.send_signal(signal.SIGTERM)
        mock.wait(timeout=10)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    pairs = list(zip(results["A"], results["B"], strict=True))
    b_name = "working tree" if args.b == str(ROOT) else args.b
    unit = "stream" if args.stream else "request"
    print(
        f"pipeline CPU per {unit}, audit {args.audit}, "
        f"body {len(chat_body(args.body_kb)):,} bytes, {args.rounds} rounds, "
        f"{time.strftime('%Y-%m-%d %H:%M')}: A {args.a}, B {b_name}"
    )
    print()
    if args.instructions:
        rows = [("instructions", "instructions, all threads", "k instructions")]
    elif args.bytecodes:
        rows = [("bytecodes", "bytecodes, event loop", "bytecodes")]
    else:
        rows = [("loop", "event loop", "us"), ("all", "all (with writer threads)", "us")]
    print(f"| measure | A {rows[0][2]}/{unit} | B {rows[0][2]}/{unit} | B/A |")
    print("|---|---:|---:|---:|")
    scale = 1e-3 if args.instructions else 1.0
    for key, label, _ in rows:
        a = statistics.median(r[key] for r in results["A"]) * scale
        b = statistics.median(r[key] for r in results["B"]) * scale
        ratio = statistics.median(rb[key] / ra[key] for ra, rb in pairs)
        print(f"| {label} | {a:.1f} | {b:.1f} | x{ratio:.3f} |")
    print()
    key = rows[0][0]
    print(
        f"per round (A, B {rows[0][2]}): "
        + ", ".join(f"{a[key] * scale:.1f}/{b[key] * scale:.1f}" for a, b in pairs)
    )
    if args.bytecodes:
        functions(results["A"][0]["functions"], results["B"][0]["functions"])
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = out / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    name.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


def functions(a: dict[str, float], b: dict[str, float], shown: int = 40) -> None:
    """The functions that run the most bytecodes per request in either tree (first round),
    side by side."""
    names = sorted(set(a) | set(b), key=lambda n: -max(a.get(n, 0), b.get(n, 0)))[:shown]
    print()
    print("| function | A bytecodes/request | B | B - A |")
    print("|---|---:|---:|---:|")
    for name in names:
        before, after = a.get(name, 0.0), b.get(name, 0.0)
        print(f"| `{name}` | {before:.1f} | {after:.1f} | {after - before:+.1f} |")


if __name__ == "__main__":
    main()
