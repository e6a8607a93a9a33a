"""`grifo plan calibrate`: measure real points and write the service models the simulator reads.

For each engine of the topology (points with equal `engine_key` are measured once) a point is
started with `python -m grifo point ... --port 0` (a point reached by `url` is measured where it
runs), and sent, after two warm-up requests, `repeats` times each:

- a short prompt with max_tokens 1: t1 (overhead + a short prefill + one token);
- the same with max_tokens D: decode time per token = (tD − t1) / (its tokens − 1);
- a long prompt with max_tokens 1: prefill time per token = (tP − t1) / (extra prompt tokens);
- c = 2..4 requests of D tokens at once: the batch gain r = (their tokens / makespan) over the
  solo rate, and batch_alpha = log r / log c, in [0, 1].

Medians of the repeats; token counts are the point's own `usage`. Slots come from the
configuration (1 for the fake engine, which generates one request at a time; llama.cpp's
`parallel`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from grifo.config.load import ConfigError, parse_point_url
from grifo.config.model import EngineConfig, GrifoConfig, PointConfig
from grifo.http.client import ConnectionPool
from grifo.planner.service import Calibration, ServiceModel, default_slots, engine_key

_MAX_PREFILL_TPS = 1e7  # a prefill too fast to see (the fake engine has none)
_MAX_DECODE_TPS = 1e6


class CalibrationError(RuntimeError):
    pass


def _text(words: int) -> str:
    lead = "Keep counting upward, one number per word, and never stop:"
    count = max(words - len(lead.split()), 1)
    return " ".join([lead, *(str(i) for i in range(1, count + 1))])


class _Prober:
    def __init__(self, host: str, port: int, model: str) -> None:
        self.pool = ConnectionPool(host, port)
        self.model = model

    async def ask(self, words: int, max_tokens: int) -> tuple[float, int, int]:
        """(seconds, prompt tokens, completion tokens) of one whole chat answer."""
        body = msgspec.json.encode(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": _text(words)}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
        start = time.perf_counter()
        resp = await self.pool.request(
            "POST",
            "/v1/chat/completions",
            headers=[(b"content-type", b"application/json")],
            body=body,
            head_timeout_s=300,
        )
        data = await resp.read()
        elapsed = time.perf_counter() - start
        if resp.status != 200:
            raise CalibrationError(f"the point answered {resp.status}: {data[:200]!r}")
        usage = json.loads(data)["usage"]
        return elapsed, int(usage["prompt_tokens"]), int(usage["completion_tokens"])


async def measure(
    host: str,
    port: int,
    model: str,
    slots: int,
    *,
    decode_tokens: int = 32,
    prefill_words: int = 400,
    repeats: int = 3,
) -> tuple[ServiceModel, dict[str, Any]]:
    probe = _Prober(host, port, model)
    try:
        for _ in range(2):
            await probe.ask(8, 4)
        short = [await probe.ask(8, 1) for _ in range(repeats)]
        long = [await probe.ask(decode_tokens + 16, decode_tokens) for _ in range(repeats)]
        wide = [await probe.ask(prefill_words, 1) for _ in range(repeats)]
        c = max(2, min(slots, 4))
        start = time.perf_counter()
        together = await asyncio.gather(
            *(probe.ask(decode_tokens + 16, decode_tokens) for _ in range(c))
        )
        makespan = time.perf_counter() - start
    finally:
        await probe.pool.close()
    t1 = statistics.median(s[0] for s in short)
    p0 = statistics.median(s[1] for s in short)
    tokens = statistics.median(x[2] for x in long)
    if tokens < 2:
        raise CalibrationError("the point stopped after one token; cannot time decoding")
    per_token = max((statistics.median(x[0] for x in long) - t1) / (tokens - 1), 1e-9)
    decode_tps = min(1 / per_token, _MAX_DECODE_TPS)
    extra = statistics.median(x[1] for x in wide) - p0
    prefill_s = statistics.median(x[0] for x in wide) - t1
    prefill_tps = extra / prefill_s if extra > 0 and prefill_s > 0 else _MAX_PREFILL_TPS
    prefill_tps = min(prefill_tps, _MAX_PREFILL_TPS)
    overhead_ms = max(t1 - p0 / prefill_tps - 1 / decode_tps, 0.0) * 1000
    solo = tokens / statistics.median(x[0] for x in long)
    gain = sum(x[2] for x in together) / makespan / solo
    alpha = min(max(math.log(gain) / math.log(c), 0.0), 1.0) if gain > 0 else 0.0
    model_ = ServiceModel(
        round(overhead_ms, 3),
        round(prefill_tps, 1),
        round(decode_tps, 2),
        round(alpha, 3),
        slots,
    )
    note = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model,
        "repeats": repeats,
        "short_s": round(t1, 5),
        "short_prompt_tokens": p0,
        "long_prompt_tokens": p0 + extra,
        "decode_tokens": tokens,
        "batch_concurrency": c,
        "batch_gain": round(gain, 3),
    }
    return model_, note


def _start_point(
    config_path: Path | None, point: PointConfig, overridden: bool, workdir: Path
) -> tuple[subprocess.Popen[str], int]:
    args = [sys.executable, "-m", "grifo", "point", "--port", "0"]
    args += ["--key-file", str(workdir / f"{point.name}.pem")]
    if config_path is not None and not overridden:
        args += ["--config", str(config_path.resolve()), "--name", point.name]
    else:
        args += ["--point-json", msgspec.json.encode(point).decode()]
    proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return proc, int(json.loads(line)["port"])
    except (ValueError, KeyError, TypeError):
        stop_process(proc)
        raise CalibrationError(f"point {point.name} did not start (said {line!r})") from None


def stop_process(proc: subprocess.Popen[str], grace_s: float = 15.0) -> None:
    """SIGTERM (it drains and exits), SIGKILL after `grace_s`; closes its stdout pipe."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _with_engine(point: PointConfig, kind: str | None, token_delay_ms: float) -> PointConfig:
    if kind is None or point.engine is None:
        return point
    engine = point.engine
    if kind == "fake":
        engine = EngineConfig(
            kind="fake",
            model_id=engine.model_id,
            context_length=engine.context_length,
            embeddings="fake",
            token_delay_ms=token_delay_ms,
        )
    else:
        engine = msgspec.structs.replace(engine, kind="llama_cpp")
    return msgspec.structs.replace(point, engine=engine)


def calibrate(
    config: GrifoConfig,
    config_path: Path | None,
    calibration: Calibration,
    *,
    names: Sequence[str] = (),
    engine: str | None = None,
    token_delay_ms: float = 10.0,
    repeats: int = 3,
    log: Any = None,
) -> Calibration:
    """Measure the named points (all by default) into `calibration`, and return it."""
    chosen = [p for p in config.points if not names or p.name in names]
    missing = set(names) - {p.name for p in config.points}
    if missing:
        raise ConfigError(f"no point named {sorted(missing)[0]!r} in the topology")
    done: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="grifo-calibrate-") as tmp:
        for point in chosen:
            run = _with_engine(point, engine, token_delay_ms)
            key = engine_key(run.engine) if run.engine is not None else f"url/{point.name}"
            if key in done:
                calibration.points[point.name] = key
                continue
            model, note = _measure_point(config_path, run, run is not point, Path(tmp), repeats)
            note["point"] = point.name
            model = dataclasses.replace(model, source=key)
            calibration.add(key, model, point.name, note)
            done[key] = point.name
            if log is not None:
                log(f"{point.name}: {key}: {model}")
    return calibration


def _measure_point(
    config_path: Path | None, point: PointConfig, overridden: bool, workdir: Path, repeats: int
) -> tuple[ServiceModel, dict[str, Any]]:
    slots = default_slots(point.engine)
    if point.engine is None:
        target = parse_point_url(point.url or "")
        if target is None:
            raise ConfigError(f"point {point.name}: no engine and no usable url")
        model = asyncio.run(_chat_model(*target))
        return asyncio.run(measure(*target, model, slots, repeats=repeats))
    proc, port = _start_point(config_path, point, overridden, workdir)
    try:
        model = asyncio.run(_chat_model("127.0.0.1", port))
        return asyncio.run(measure("127.0.0.1", port, model, slots, repeats=repeats))
    finally:
        stop_process(proc)


async def _chat_model(host: str, port: int) -> str:
    pool = ConnectionPool(host, port)
    try:
        resp = await pool.request("GET", "/health", head_timeout_s=30)
        health = json.loads(await resp.read())
    finally:
        await pool.close()
    for card in health.get("models", []):
        if card.get("kind") == "chat":
            return str(card["id"])
    raise CalibrationError("the point serves no chat model")
