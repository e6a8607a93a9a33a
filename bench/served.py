"""The embedded engine served: tokens/s and time to first token at a point and through grifo.

Starts one `grifo point` on the embedded llama.cpp engine (`--gpu-layers` for a GPU build of
llama-cpp-python) and `grifo serve` in front of it, then, for each concurrency, sends that many
chat completions at once (each asking for `--tokens` tokens, greedy) straight to the point and
through the gateway, alternately, `--rounds` times. Reports aggregate completion tokens/s (from
the answers' `usage`) and the median time to the first streamed token, and the gateway's ratio.

Usage: python bench/served.py [--model smollm2 | PATH.gguf] [--gpu-layers all]
                              [--concurrency 1,8,32] [--tokens 128] [--rounds 3] [--threads auto]
                              [--fake-token-ms 20]   (the fake engine: no engine CPU at all)
Writes bench/results/served-<time>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from overhead import KEY, wait_http

ROOT = Path(__file__).resolve().parent
POINT_PORT, GATEWAY_PORT = 18911, 18910
PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a printing press works.",
    "Describe, step by step, how to bake bread at home.",
    "Tell the history of the bicycle in many paragraphs.",
]


def config() -> str:
    return f"""
gateway: {{port: {GATEWAY_PORT}, health_interval_s: 1.0}}
points:
  - {{name: engine, site: bench, region: local, jurisdiction: PE, tier: edge,
     url: "http://127.0.0.1:{POINT_PORT}"}}
tenants: [{{name: bench}}]
keys: [{{id: bench-1, tenant: bench, env: GRIFO_BENCH_KEY}}]
"""


def body(model: str, i: int, tokens: int, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": stream,
        }
    ).encode()


def one(port: int, payload: bytes, stream: bool) -> tuple[int, float]:
    """(completion tokens, seconds to the first token or to the answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    conn.request("POST", "/v1/chat/completions", payload, headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{port}: {response.status} {response.read()[:200]!r}")
    if not stream:
        answer = json.loads(response.read())
        conn.close()
        return answer["usage"]["completion_tokens"], time.perf_counter() - start
    first = 0.0
    for line in response:  # SSE: the first event with text in it holds the first token
        if not first and line.startswith(b"data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                first = time.perf_counter() - start
    conn.close()
    return 0, first


def wave(port: int, model: str, n: int, tokens: int, stream: bool) -> tuple[float, float]:
    """n requests at once: (aggregate completion tokens/s, median seconds per request's
    first token (stream) or answer)."""
    results: list[tuple[int, float]] = [(0, 0.0)] * n

    def run(i: int) -> None:
        results[i] = one(port, body(model, i, tokens, stream), stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return sum(r[0] for r in results) / elapsed, statistics.median(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--gpu-layers", default="0")
    parser.add_argument("--threads", default="auto")
    parser.add_argument(
        "--fake-token-ms",
        type=float,
        default=0.0,
        help="the fake engine instead, this many ms per token (the gateway's share alone)",
    )
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    widths = [int(c) for c in args.concurrency.split(",")]
    env = {**os.environ, "GRIFO_BENCH_KEY": KEY}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bench.yaml").write_text(config())
        grifo = [sys.executable, "-m", "grifo"]
        engine: dict[str, object] = {"kind": "fake", "token_delay_ms": args.fake_token_ms}
        if not args.fake_token_ms:
            threads = args.threads if args.threads == "auto" else int(args.threads)
            gpu = args.gpu_layers if args.gpu_layers == "all" else int(args.gpu_layers)
            engine = {"model": args.model, "threads": threads, "gpu_layers": gpu}
        engine |= {"parallel": max(widths), "embeddings": "none"}
        point_json: dict[str, object] = {"name": "engine", "site": "bench", "region": "local"}
        point_json |= {"jurisdiction": "PE", "tier": "edge", "engine": engine}
        point = subprocess.Popen(
            [
                *(*grifo, "point", "--point-json", json.dumps(point_json)),
                *("--port", str(POINT_PORT), "--key-file", str(work / "point.pem")),
            ],
            stdout=subprocess.DEVNULL,
            env={**env, "GRIFO_CACHE_DIR": str(work / "cache")},
        )
        gateway = None
        try:
            wait_http(f"http://127.0.0.1:{POINT_PORT}/health", timeout_s=300, process=point)
            with urllib.request.urlopen(f"http://127.0.0.1:{POINT_PORT}/v1/models") as models:
                model = json.loads(models.read())["data"][0]["id"]
            gateway = subprocess.Popen(
                [*grifo, "serve", "--config", str(work / "bench.yaml"), "--state-dir", str(work)],
                stdout=subprocess.DEVNULL,
                env=env,
            )
            wait_http(f"http://127.0.0.1:{GATEWAY_PORT}/readyz", process=gateway)
            wave(POINT_PORT, model, max(widths), 16, False)  # warm both paths
            wave(GATEWAY_PORT, model, max(widths), 16, False)
            rows = []
            for n in widths:
                runs: dict[str, list[tuple[float, float]]] = {"point": [], "gateway": []}
                ttft: dict[str, list[float]] = {"point": [], "gateway": []}
                for _ in range(args.rounds):
                    for name, port in (("point", POINT_PORT), ("gateway", GATEWAY_PORT)):
                        runs[name].append(wave(port, model, n, args.tokens, False))
                        ttft[name].append(wave(port, model, n, args.tokens, True)[1])
                row: dict[str, float] = {"concurrency": n}
                for name in runs:
                    row[f"{name}_tokens_s"] = statistics.median(r[0] for r in runs[name])
                    row[f"{name}_ttft_ms"] = 1000 * statistics.median(ttft[name])
                rows.append(row)
        finally:
            for process in (gateway, point):
                if process is not None:
                    process.terminate()
                    process.wait(30)
    name = f"fake, {args.fake_token_ms} ms a token" if args.fake_token_ms else args.model
    head = (
        f"{name}, GPU layers {args.gpu_layers}, threads {args.threads}, {args.tokens} tokens,"
        f" {args.rounds} rounds, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(head + "\n")
    print("| concurrent | point tok/s | via grifo tok/s | ratio | point TTFT p50 | via grifo |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['point_tokens_s']:.0f} | {r['gateway_tokens_s']:.0f} | "
            f"x{r['gateway_tokens_s'] / r['point_tokens_s']:.3f} | {r['point_ttft_ms']:.1f} ms | "
            f"{r['gateway_ttft_ms']:.1f} ms |"
        )
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    out = results / f"served-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"setup": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
