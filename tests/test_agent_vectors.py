"""The site-local vector search tool, its index and `grifo index` (FakeEmbedder, and MiniLM)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import pytest

from grifo.agent.tools.base import ToolArgumentsError, ToolError, ToolResult
from grifo.agent.tools.index import (
    IndexMismatchError,
    Passage,
    VectorIndexError,
    build_index,
    connect,
    open_index,
    split_passages,
)
from grifo.agent.tools.vectors import VectorSearchTool, format_passages
from grifo.cli import main
from grifo.config.tools import VectorToolConfig
from grifo.point.engines.base import Embedder, EmbeddingResult
from grifo.point.engines.fake import FakeEmbedder

ALPHA = "Alpha reactors cool with heavy water. Pumps circulate it through the core."
BETA = "Beta gardens grow tomatoes and basil.\n\nWater them at dawn in summer."


def _folder(root: Path) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "alpha.md").write_text(ALPHA)
    (docs / "sub" / "beta.txt").write_text(BETA)
    (docs / ".hidden.txt").write_text("hidden secret words")
    (docs / ".git").mkdir()
    (docs / ".git" / "notes.txt").write_text("git internal words")
    (docs / "photo.png").write_bytes(b"\x89PNG not text")
    (docs / "binary.txt").write_bytes(b"abc\x00def")
    (docs / "latin1.csv").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    (docs / "empty.rst").write_text("  \n\n ")
    (root / "outside.txt").write_text("outside words must not be indexed")
    (docs / "escape.txt").symlink_to(root / "outside.txt")
    return docs


def _tool(
    index: Path, embedder: Embedder | None = None, top_k: int = 4, max_result_chars: int = 4000
) -> VectorSearchTool:
    config = VectorToolConfig(index=str(index), top_k=top_k, max_result_chars=max_result_chars)
    return VectorSearchTool(config, embedder or FakeEmbedder())


def _all_sources(index: Path) -> list[tuple[str, int]]:
    with closing(connect(index, read_only=True)) as conn:
        rows = conn.execute("SELECT source, chunk FROM passages ORDER BY id").fetchall()
    return [(str(s), int(c)) for s, c in rows]


def test_split_passages_bounded_overlapping_and_complete() -> None:
    paragraphs = [
        f"Paragraph {p} " + " ".join(f"word{p}x{i}." for i in range(40)) for p in range(8)
    ]
    text = "\n\n".join(paragraphs)
    passages = split_passages(text, size=300, overlap=60)
    assert len(passages) > 8
    assert all(len(p) <= 300 for p in passages)
    words = set(text.split())
    assert words == set().union(*(p.split() for p in passages))
    for before, after in itertools.pairwise(passages):
        assert after.split()[0] in before.split()  # starts with the tail of the one before
    assert split_passages("One short paragraph.\n\nAnother one.", 800, 100) == [
        "One short paragraph.\n\nAnother one."
    ]
    assert split_passages("  \n\n  ") == []
    assert all(len(p) <= 50 for p in split_passages("x" * 500, size=50, overlap=10))
    with pytest.raises(ValueError, match="overlap"):
        split_passages("text", size=100, overlap=50)


def test_build_index_walks_only_readable_text_inside(tmp_path: Path) -> None:
    docs = _folder(tmp_path)
    (docs / "link.md").symlink_to(docs / "alpha.md")  # a symlink staying inside is indexed
    stats = build_index(docs, tmp_path / "idx.db", FakeEmbedder())
    assert (stats.files, stats.passages, stats.skipped) == (3, 3, 4)
    assert (stats.model_id, stats.dimensions) == ("fake-embed", 8)
    assert _all_sources(tmp_path / "idx.db") == [
        ("alpha.md", 0),
        ("link.md", 0),
        ("sub/beta.txt", 0),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "idx.db", "outside.txt"]


def test_search_returns_the_matching_passage_first(tmp_path: Path) -> None:
    docs = _folder(tmp_path)
    build_index(docs, tmp_path / "idx.db", FakeEmbedder())
    tool = _tool(tmp_path / "idx.db", top_k=2)
    assert tool.spec.name == "search_documents"
    assert tool.spec.parameters["required"] == ["query"]
    assert tool.spec.parameters["additionalProperties"] is False
    result = asyncio.run(tool.call({"query": BETA}))
    assert result.sources == ("sub/beta.txt#0", "alpha.md#0")
    assert result.text.startswith("[1] sub/beta.txt#0\nBeta gardens")
    assert f"\n\n[2] alpha.md#0\n{ALPHA}" in result.text
    first = asyncio.run(tool.call({"query": ALPHA}))
    assert first.sources[0] == "alpha.md#0"


def test_result_is_cut_to_max_result_chars(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"doc{i}.txt").write_text(f"document {i} " + "filler text " * 60)
    build_index(docs, tmp_path / "idx.db", FakeEmbedder())
    result = asyncio.run(
        _tool(tmp_path / "idx.db", top_k=5, max_result_chars=900).call({"query": "x"})
    )
    assert len(result.text) <= 900
    assert result.text.endswith("…")
    assert 1 <= len(result.sources) < 5
    assert result.text.count("\n\n[") == len(result.sources) - 1
    uncut = asyncio.run(_tool(tmp_path / "idx.db", top_k=5).call({"query": "x"}))
    assert len(uncut.sources) == 5
    assert not uncut.text.endswith("…")


def test_format_passages_cut_inside_the_first_passage() -> None:
    passages = [Passage("a.txt", 0, "y" * 500, 0.1), Passage("b.txt", 3, "z" * 10, 0.2)]
    result = format_passages(passages, 64)
    assert result == ToolResult("[1] a.txt#0\n" + "y" * 51 + "…", ("a.txt#0",))
    whole = format_passages(passages, 10_000)
    assert whole.text == f"[1] a.txt#0\n{'y' * 500}\n\n[2] b.txt#3\n{'z' * 10}"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "'query' must be a non-empty string"),
        ({"query": "   "}, "'query' must be a non-empty string"),
        ({"query": 7}, "'query' must be a non-empty string"),
        ({"query": "q" * 2001}, "longer than 2000"),
        ({"query": "ok", "limit": 3}, "unexpected arguments: 'limit'"),
    ],
)
def test_argument_errors(tmp_path: Path, arguments: dict[str, object], message: str) -> None:
    tool = _tool(tmp_path / "missing.db")
    with pytest.raises(ToolArgumentsError, match=message):
        asyncio.run(tool.call(arguments))


def test_missing_and_empty_index_are_tool_errors(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"index missing\.db does not exist") as missing:
        asyncio.run(_tool(tmp_path / "missing.db").call({"query": "anything"}))
    assert str(tmp_path) not in str(missing.value)  # the site's paths stay at the site
    docs = _folder(tmp_path)
    build_index(docs, tmp_path / "idx.db", FakeEmbedder())
    with closing(connect(tmp_path / "idx.db", read_only=False)) as conn:
        conn.execute("DELETE FROM vec_passages")
        conn.execute("DELETE FROM passages")
        conn.commit()
    with pytest.raises(ToolError, match=r"index idx\.db is empty"):
        asyncio.run(_tool(tmp_path / "idx.db").call({"query": "anything"}))
    (tmp_path / "junk.db").write_text("not a database at all")
    with pytest.raises(ToolError, match=r"not a grifo vector index"):
        asyncio.run(_tool(tmp_path / "junk.db").call({"query": "anything"}))


def test_empty_folder_and_missing_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.md").write_text("\n")
    with pytest.raises(VectorIndexError, match="no text files"):
        build_index(tmp_path / "empty", tmp_path / "idx.db", FakeEmbedder())
    with pytest.raises(VectorIndexError, match="is not a folder"):
        build_index(tmp_path / "nope", tmp_path / "idx.db", FakeEmbedder())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no index, no temp file


def test_an_index_refuses_another_embedder(tmp_path: Path) -> None:
    build_index(_folder(tmp_path), tmp_path / "idx.db", FakeEmbedder())
    with closing(open_index(tmp_path / "idx.db", FakeEmbedder())):
        pass
    with pytest.raises(IndexMismatchError, match=r"'fake-embed' \(8 dimensions\), not 'other'"):
        open_index(tmp_path / "idx.db", FakeEmbedder(model_id="other"))
    with pytest.raises(IndexMismatchError, match=r"not 'fake-embed' \(16 dimensions\)"):
        open_index(tmp_path / "idx.db", FakeEmbedder(dimensions=16))
    tool = _tool(tmp_path / "idx.db", FakeEmbedder(dimensions=16))
    with pytest.raises(ToolError, match="was built with model 'fake-embed'"):
        asyncio.run(tool.call({"query": ALPHA}))


class _FailingEmbedder(FakeEmbedder):
    def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        raise RuntimeError("embedder crashed half-way")


def test_rebuild_replaces_the_index_atomically(tmp_path: Path) -> None:
    docs = _folder(tmp_path)
    index = tmp_path / "idx.db"
    build_index(docs, index, FakeEmbedder())
    old_inode = index.stat().st_ino
    reader = connect(index, read_only=True)  # a search in flight during the rebuild
    try:
        assert reader.execute("SELECT count(*) FROM passages").fetchone() == (2,)
        (docs / "alpha.md").unlink()
        (docs / "gamma.rst").write_text("Gamma rays and telescopes.")
        build_index(docs, index, FakeEmbedder(), batch_size=1)
        old = reader.execute("SELECT source FROM passages ORDER BY id").fetchall()
        assert [s for (s,) in old] == ["alpha.md", "sub/beta.txt"]  # still the whole old index
    finally:
        reader.close()
    assert index.stat().st_ino != old_inode
    assert _all_sources(index) == [("gamma.rst", 0), ("sub/beta.txt", 0)]
    result = asyncio.run(_tool(index, top_k=1).call({"query": "Gamma rays and telescopes."}))
    assert result.sources == ("gamma.rst#0",)

    with pytest.raises(RuntimeError, match="half-way"):
        build_index(docs, index, _FailingEmbedder())
    assert _all_sources(index) == [("gamma.rst", 0), ("sub/beta.txt", 0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "idx.db", "outside.txt"]


def test_concurrent_calls_share_one_tool(tmp_path: Path) -> None:
    build_index(_folder(tmp_path), tmp_path / "idx.db", FakeEmbedder())
    tool = _tool(tmp_path / "idx.db", top_k=1)

    async def many() -> list[ToolResult]:
        queries = [ALPHA, BETA] * 16
        return await asyncio.gather(*(tool.call({"query": q}) for q in queries))

    results = asyncio.run(many())
    assert [r.sources for r in results] == [("alpha.md#0",), ("sub/beta.txt#0",)] * 16


def test_cli_errors_exit_2_without_a_stack_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", str(tmp_path / "nope"), str(tmp_path / "idx.db")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err
    assert "Traceback" not in err
    (tmp_path / "only-images").mkdir()
    (tmp_path / "only-images" / "a.png").write_bytes(b"\x89PNG")
    assert main(["index", str(tmp_path / "only-images"), str(tmp_path / "idx.db")]) == 2
    assert "no text files" in capsys.readouterr().err
    assert main(["index", str(tmp_path), str(tmp_path / "idx.db"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "idx.db").exists()


def test_cli_builds_an_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def fake_minilm(threads: int = 1) -> FakeEmbedder:
        seen.append(threads)
        return FakeEmbedder()

    monkeypatch.setattr("grifo.point.engines.minilm.MiniLMEmbedder", fake_minilm)
    docs = _folder(tmp_path)
    index = tmp_path / "out" / "idx.db"
    assert main(["index", str(docs), str(index), "--threads", "3"]) == 0
    out = capsys.readouterr().out
    assert seen == [3]
    assert out.startswith(f"{index}: 2 files (4 skipped), 2 passages, ")
    assert out.endswith(" s (fake-embed, 8 dims)\n")
    assert out.count("\n") == 1
    assert _all_sources(index) == [("alpha.md", 0), ("sub/beta.txt", 0)]


TOPICS = {
    "volcanoes.md": "Volcanoes erupt when magma rises through the crust. Lava flows and ash "
    "clouds from an eruption can bury nearby towns; geologists monitor seismic tremors.",
    "baking.txt": "To bake sourdough bread, feed the starter, knead the dough with flour and "
    "water, let it proof overnight and bake it in a hot oven until the crust is golden.",
    "football.rst": "The striker scored a late goal and the team won the championship final; "
    "the goalkeeper saved a penalty and the fans celebrated in the stadium.",
}


@pytest.mark.engine
def test_minilm_index_finds_the_topic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grifo.point.engines.minilm import MiniLMEmbedder

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in TOPICS.items():
        (docs / name).write_text(text)
    index = tmp_path / "idx.db"
    assert main(["index", str(docs), str(index), "--threads", "2"]) == 0
    assert "3 files, 3 passages" in capsys.readouterr().out
    tool = _tool(index, MiniLMEmbedder(), top_k=3)
    expected = {
        "How do I make bread rise before putting it in the oven?": "baking.txt#0",
        "Which player kicked the ball into the net to win the match?": "football.rst#0",
        "What happens when a mountain spews molten rock?": "volcanoes.md#0",
    }
    for query, source in expected.items():
        result = asyncio.run(tool.call({"query": query}))
        assert result.sources[0] == source, (query, result.sources)
        assert len(result.sources) == 3
    with pytest.raises(ToolError, match="was built with model 'all-minilm-l6-v2'"):
        asyncio.run(_tool(index).call({"query": "bread"}))
