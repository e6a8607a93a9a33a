"""The vector search tool of an agent run, over an index of this site's documents, and
`grifo index <folder> <index-file>`, which builds that index with the MiniLM embedder.

The documents never leave the site: the index is a local SQLite file (see `index.py`), queries
are embedded by the point's own embedder and only the closest passages reach the model.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import closing
from pathlib import Path

from grifo.agent.tools.base import (
    JsonObject,
    ToolArgumentsError,
    ToolError,
    ToolResult,
    ToolSpec,
    require_str,
)
from grifo.agent.tools.index import (
    IndexStats,
    Passage,
    VectorIndexError,
    build_index,
    open_index,
    search,
    text_files,
)
from grifo.config.tools import VectorToolConfig
from grifo.point.engines.base import Embedder

__all__ = ["VectorSearchTool", "add_parser", "format_passages", "run"]

MAX_QUERY_CHARS = 2000
_ELLIPSIS = "…"


class VectorSearchTool:
    """`search_documents(query)`: the `top_k` passages of the site's index closest to `query`.

    Each call embeds the query and reads the index in a worker thread, over a read-only
    connection of its own, so concurrent runs may share one tool. A rebuilt index (renamed into
    place by `grifo index`) is picked up by the next call.
    """

    def __init__(self, config: VectorToolConfig, embedder: Embedder) -> None:
        self._config = config
        self._embedder = embedder
        self._index = Path(config.index)
        self._spec = ToolSpec(
            name=config.name,
            description=config.description,
            parameters={
                "type": "object",
                "properties": {
                    "query": {
                        "type": "string",
                        "description": "What to look for, in natural language; the passages "
                        "closest in meaning are returned with their source.",
                    }
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def call(self, arguments: JsonObject) -> ToolResult:
        query = require_str(arguments, "query", MAX_QUERY_CHARS)
        extra = sorted(set(arguments) - {"query"})
        if extra:
            raise ToolArgumentsError(f"unexpected arguments: {', '.join(map(repr, extra))}")
        passages = await asyncio.to_thread(self._search, query)
        return format_passages(passages, self._config.max_result_chars)

    def _search(self, query: str) -> list[Passage]:
        """Blocking: open the index, embed the query, read the nearest passages."""
        name = self._index.name
        try:
            with closing(open_index(self._index, self._embedder)) as conn:
                (vector,) = self._embedder.embed([query]).vectors
                if len(vector) != self._embedder.dimensions:
                    raise ToolError("the embedding model returned a malformed vector")
                passages = search(conn, vector, self._config.top_k)
        except VectorIndexError as exc:
            raise ToolError(f"document search unavailable: {exc}") from exc
        if not passages:
            raise ToolError(f"document search unavailable: index {name} is empty")
        return passages


def format_passages(passages: list[Passage], max_chars: int) -> ToolResult:
    """Numbered passages, each labelled with its source, cut to `max_chars` characters in all;
    `sources` lists (as `path#chunk`) the passages that made it into the text."""
    parts: list[str] = []
    sources: list[str] = []
    room = max_chars
    for n, passage in enumerate(passages, 1):
        source = f"{passage.source}#{passage.chunk}"
        block = ("\n\n" if parts else "") + f"[{n}] {source}\n{passage.text}"
        if len(block) > room:
            if parts and room < len(block) - len(passage.text) + 20:
                break  # no room for more than the label: leave this passage out
            parts.append(block[: room - len(_ELLIPSIS)] + _ELLIPSIS)
            sources.append(source)
            break
        parts.append(block)
        sources.append(source)
        room -= len(block)
    return ToolResult(text="".join(parts), sources=tuple(sources))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    index = sub.add_parser(
        "index",
        help="index a folder of documents for an agent run's vector search tool",
        description="Split the text files (.txt .md .rst .json .csv) under FOLDER into passages, "
        "embed them with all-MiniLM-L6-v2 and write INDEX-FILE (one SQLite file), replacing "
        "any index there at once. Hidden files and symlinks leaving FOLDER are left out.",
    )
    index.add_argument("folder", type=Path, help="the documents to index")
    index.add_argument(
        "index_file", type=Path, metavar="index-file", help="the index to write (vectors.index)"
    )
    index.add_argument("--threads", type=int, default=1, help="embedding threads (default 1)")


def run(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    if args.threads < 1:
        return _fail(f"--threads must be at least 1, got {args.threads}")
    if not folder.is_dir():
        return _fail(f"{folder} is not a folder")
    if next(text_files(folder), None) is None:
        return _fail(f"no text files (.txt .md .rst .json .csv) under {folder}")
    from grifo.point.engines.minilm import MiniLMEmbedder, ModelFilesMissingError

    try:
        stats = build_index(folder, args.index_file, MiniLMEmbedder(threads=args.threads))
    except (VectorIndexError, ModelFilesMissingError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {args.index_file}: {exc}", 1)
    print(_summary(stats, args.index_file))
    return 0


def _summary(stats: IndexStats, index: Path) -> str:
    skipped = f" ({stats.skipped} skipped)" if stats.skipped else ""
    return (
        f"{index}: {stats.files} files{skipped}, {stats.passages} passages, "
        f"{stats.seconds:.2f} s ({stats.model_id}, {stats.dimensions} dims)"
    )


def _fail(message: str, code: int = 2) -> int:
    print(f"grifo index: {message}", file=sys.stderr)
    return code
