"""The service-time model of a point, and the calibration file that holds it per engine.

A point runs at most `slots` generations at once; the rest wait in FIFO order (the fake engine
and any sequential engine: 1; llama.cpp: its `parallel`). One generation alone needs

    work = overhead + prompt / prefill_tokens_per_s + completion / decode_tokens_per_s

seconds, and its first token is out after overhead + prompt / prefill + 1 / decode. With n
generations running, each advances at n^batch_alpha / n of its solo speed: alpha 0 is one
shared processor (no gain from batching), alpha 1 is perfect batching.

The calibration file (written by `grifo plan calibrate`) maps engine keys (`engine_key`:
kind, model, threads, parallel, quantization, GPU layers, and the fake engine's token delay) to
measured models, and point names to the key they were measured with. A point without an entry gets
`default_model`: rough figures for its engine kind, marked as such in the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grifo.config.model import EngineConfig, PointConfig
from grifo.cpus import available_cpus

CALIBRATION_VERSION = 1


@dataclass(frozen=True, slots=True)
class ServiceModel:
    overhead_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    batch_alpha: float
    slots: int
    source: str = "default"  # the calibration key, or "default"

    def work_s(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.first_token_work_s(prompt_tokens) + max(completion_tokens - 1, 0) / (
            self.decode_tokens_per_s
        )

    def first_token_work_s(self, prompt_tokens: int) -> float:
        return (
            self.overhead_ms / 1000
            + prompt_tokens / self.prefill_tokens_per_s
            + 1 / self.decode_tokens_per_s
        )

    def speed(self, running: int) -> float:
        """Each running generation's progress per second, relative to running alone."""
        if running <= 1:
            return 1.0
        return float(running**self.batch_alpha / running)


def engine_key(engine: EngineConfig) -> str:
    if engine.kind == "proxy":
        return f"proxy/{engine.upstream_url}"
    model = engine.model_id or ("fake-chat" if engine.kind == "fake" else engine.model)
    key = (
        f"{engine.kind}/{model}/threads={engine.threads}"
        f"/parallel={engine.parallel}/quantization={engine.quantization}"
    )
    if engine.kind == "fake":
        key += f"/token_delay_ms={engine.token_delay_ms:g}"
    if engine.gpu_layers:  # absent when 0: calibrations made before GPU points stay valid
        key += f"/gpu_layers={engine.gpu_layers}"
    return key


def model_id(point: PointConfig) -> str | None:
    """The chat model a point serves, as far as its configuration says (None: a point reached
    by URL, whose models only it knows)."""
    engine = point.engine
    if engine is None or engine.kind == "proxy":
        return None
    if engine.model_id:
        return engine.model_id
    if engine.kind == "fake":
        return "fake-chat"
    from grifo.point.engines.llama import PACKAGED_MODELS

    if engine.model in PACKAGED_MODELS:
        return PACKAGED_MODELS[engine.model][2]
    return Path(engine.model).stem.lower()


def default_slots(engine: EngineConfig | None) -> int:
    if engine is None or engine.kind == "proxy":
        return 8
    return 1 if engine.kind == "fake" else engine.parallel


def default_model(point: PointConfig) -> ServiceModel:
    """Uncalibrated figures: the fake engine's are exact but for its overhead; llama.cpp's
    are SmolLM2-135M's order of magnitude per CPU thread, or on a GPU (an H100: ~750 tokens/s
    alone, 4.5x that with 8 running, bench/README.md); a remote point's are a guess."""
    engine = point.engine
    slots = default_slots(engine)
    if engine is not None and engine.kind == "fake":
        delay = engine.token_delay_ms
        return ServiceModel(1.0, 1e7, 1000 / delay if delay else 1e5, 0.0, slots)
    if engine is not None and engine.kind == "llama_cpp" and engine.gpu_layers:
        return ServiceModel(2.0, 20_000.0, 750.0, 0.7, slots)
    if engine is not None and engine.kind == "llama_cpp":
        threads = available_cpus() if engine.threads == "auto" else engine.threads
        return ServiceModel(5.0, 400.0 * threads, 40.0 * threads, 0.6, slots)
    return ServiceModel(20.0, 2000.0, 50.0, 0.8, slots)


@dataclass(slots=True)
class Calibration:
    engines: dict[str, ServiceModel]
    points: dict[str, str]  # point name -> the engine key it was measured with
    notes: dict[str, dict[str, Any]]  # engine key -> how it was measured

    @classmethod
    def empty(cls) -> Calibration:
        return cls({}, {}, {})

    def model_for(self, point: PointConfig) -> ServiceModel:
        key = self.points.get(point.name)
        if key is None and point.engine is not None:
            key = engine_key(point.engine)
        found = self.engines.get(key) if key is not None else None
        return found if found is not None else default_model(point)

    def add(self, key: str, model: ServiceModel, point: str, note: dict[str, Any]) -> None:
        self.engines[key] = model
        self.points[point] = key
        self.notes[key] = note


def load_calibration(path: Path | None) -> Calibration:
    if path is None or not path.exists():
        return Calibration.empty()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {CALIBRATION_VERSION}")
        engines: dict[str, ServiceModel] = {}
        notes: dict[str, dict[str, Any]] = {}
        for key, entry in data["engines"].items():
            engines[key] = _checked(
                ServiceModel(
                    float(entry["overhead_ms"]),
                    float(entry["prefill_tokens_per_s"]),
                    float(entry["decode_tokens_per_s"]),
                    float(entry["batch_alpha"]),
                    int(entry["slots"]),
                    key,
                )
            )
            notes[key] = dict(entry.get("measured", {}))
        points = {str(k): str(v) for k, v in data.get("points", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a grifo calibration file: {exc}") from None
    return Calibration(engines, points, notes)


def _checked(model: ServiceModel) -> ServiceModel:
    rates = (model.prefill_tokens_per_s, model.decode_tokens_per_s)
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"{model.source}: token rates must be positive")
    if model.overhead_ms < 0 or not 0 <= model.batch_alpha <= 1 or model.slots < 1:
        raise ValueError(f"{model.source}: overhead ≥ 0, 0 ≤ batch_alpha ≤ 1, slots ≥ 1")
    return model


def save_calibration(calibration: Calibration, path: Path) -> None:
    engines = {}
    for key, model in sorted(calibration.engines.items()):
        entry = asdict(model)
        entry.pop("source")
        entry["measured"] = calibration.notes.get(key, {})
        engines[key] = entry
    data = {
        "version": CALIBRATION_VERSION,
        "engines": engines,
        "points": dict(sorted(calibration.points.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
