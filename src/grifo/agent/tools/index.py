"""Site-local vector indexes: one SQLite file (sqlite-vec) of passages and their embeddings.

`build_index` walks a folder for text files, splits them into passages, embeds them and writes
the index to a temporary file that is renamed over the old one, so a reader never sees half an
index. `open_index` opens one read-only and refuses an embedder other than the one that built it;
`search` returns the passages closest to a query vector.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from grifo.point.engines.base import Embedder

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".json", ".csv"})
FORMAT_VERSION = "1"
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class VectorIndexError(Exception):
    """An index cannot be built, opened or read (the message says why; no stack trace needed)."""


class IndexMismatchError(VectorIndexError):
    """The index was built with another embedding model (id or dimensions differ)."""


@dataclass(frozen=True, slots=True)
class IndexStats:
    files: int
    """Text files that gave at least one passage."""
    passages: int
    skipped: int
    """Files with a text suffix left out: undecodable, binary, empty, or a symlink leaving."""
    seconds: float
    model_id: str
    dimensions: int


@dataclass(frozen=True, slots=True)
class Passage:
    source: str
    """The file's path relative to the indexed folder (POSIX separators)."""
    chunk: int
    text: str
    distance: float


@functools.cache
def _driver() -> Any:
    """The stdlib `sqlite3` when it can load extensions, else `sqlean` (sqlean-py: the same
    DB-API with its own SQLite), as many Python builds (pyenv's, macOS's) cannot."""
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import sqlean
    except ImportError as exc:
        raise VectorIndexError(
            "this Python's sqlite3 cannot load extensions; install sqlean-py "
            "(pip install 'grifo[agents]')"
        ) from exc
    return sqlean


@functools.cache
def _db_errors() -> tuple[type[Exception], ...]:
    """The exception bases of both drivers (sqlean's are not sqlite3's)."""
    try:
        import sqlean
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, sqlean.Error)


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    """A connection with sqlite-vec loaded (read-only through a `mode=ro` URI)."""
    try:
        import sqlite_vec
    except ImportError as exc:
        raise VectorIndexError("sqlite-vec is not installed: pip install 'grifo[agents]'") from exc
    driver = _driver()
    try:
        if read_only:
            conn = driver.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        else:
            conn = driver.connect(path)
    except _db_errors() as exc:
        raise VectorIndexError(f"cannot open index {path.name}: {exc}") from exc
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except _db_errors() as exc:
        conn.close()
        raise VectorIndexError(f"cannot load the sqlite-vec extension: {exc}") from exc
    return cast(sqlite3.Connection, conn)


def split_passages(text: str, size: int = 800, overlap: int = 100) -> list[str]:
    """`text` in passages of at most `size` characters, cut at paragraph, then sentence, then
    word boundaries; each passage after the first starts with the last ~`overlap` characters
    of the one before it."""
    if overlap < 0 or size <= 2 * overlap:
        raise ValueError(f"need size > 2 * overlap >= 0, got size={size}, overlap={overlap}")
    passages: list[str] = []
    current = ""
    for unit, sep in _units(text, size - overlap - 1):
        if current and len(current) + len(sep) + len(unit) > size:
            passages.append(current)
            tail = _tail(current, overlap)
            current = f"{tail} {unit}" if tail else unit
        else:
            current = f"{current}{sep}{unit}" if current else unit
    if current:
        passages.append(current)
    return passages


def _units(text: str, limit: int) -> Iterator[tuple[str, str]]:
    """Pieces of at most `limit` characters, each with the separator that joins it to the last."""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph) <= limit:
            yield paragraph, "\n\n"
            continue
        sep = "\n\n"
        for sentence in _SENTENCE_END.split(paragraph):
            for piece in _hard_split(sentence, limit):
                yield piece, sep
                sep = " "


def _hard_split(sentence: str, limit: int) -> Iterator[str]:
    """`sentence` cut at the last whitespace before each `limit` (mid-word when there is none)."""
    while len(sentence) > limit:
        cut = sentence.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        yield sentence[:cut].strip()
        sentence = sentence[cut:].strip()
    if sentence:
        yield sentence


def _tail(passage: str, overlap: int) -> str:
    """The last `overlap` characters of `passage`, starting at a word boundary."""
    if overlap == 0:
        return ""
    tail = passage[-overlap:]
    if len(passage) > overlap and not passage[-overlap - 1].isspace():
        space = tail.find(" ")
        tail = tail[space + 1 :] if space >= 0 else ""
    return tail.strip()


def text_files(folder: Path) -> Iterator[Path]:
    """Files under `folder` with a text suffix, sorted, leaving out hidden files and folders,
    symlinked folders, and symlinks whose target lies outside `folder`."""
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in TEXT_SUFFIXES:
                continue
            yield path


def _read_text(path: Path, root: Path) -> str | None:
    """The file's text, or None for a symlink leaving `root`, a binary or undecodable file."""
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def build_index(
    folder: Path,
    index: Path,
    embedder: Embedder,
    *,
    passage_chars: int = 800,
    overlap_chars: int = 100,
    batch_size: int = 64,
) -> IndexStats:
    """Index the text files under `folder` into `index`, replacing any index there at once."""
    started = time.monotonic()
    if not folder.is_dir():
        raise VectorIndexError(f"{folder} is not a folder")
    if index.exists() and not index.is_file():
        raise VectorIndexError(f"{index} exists and is not a file")
    index.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{index.name}.", suffix=".tmp", dir=index.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with closing(connect(tmp, read_only=False)) as conn:
            try:
                files, passages, skipped = _fill(
                    conn, folder, embedder, passage_chars, overlap_chars, batch_size
                )
            except _db_errors() as exc:
                raise VectorIndexError(f"cannot write index {index.name}: {exc}") from exc
        if passages == 0:
            raise VectorIndexError(f"no text files with content under {folder}")
        _fsync(tmp)
        os.replace(tmp, index)
        _fsync(index.parent)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    return IndexStats(files, passages, skipped, seconds, embedder.model_id, embedder.dimensions)


def _fill(
    conn: sqlite3.Connection,
    folder: Path,
    embedder: Embedder,
    passage_chars: int,
    overlap_chars: int,
    batch_size: int,
) -> tuple[int, int, int]:
    """Create the tables in a fresh database and write every passage; (files, passages, skipped)."""
    dims = int(embedder.dimensions)
    conn.executescript(
        "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE passages (id INTEGER PRIMARY KEY, source TEXT NOT NULL,"
        " chunk INTEGER NOT NULL, text TEXT NOT NULL);"
        f"CREATE VIRTUAL TABLE vec_passages USING vec0(embedding float[{dims}]"
        " distance_metric=cosine);"
    )
    meta = {"format": FORMAT_VERSION, "model_id": embedder.model_id, "dimensions": str(dims)}
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
    root = folder.resolve()
    files = skipped = 0
    batch: list[tuple[str, int, str]] = []
    next_id = 1
    for path in text_files(folder):
        text = _read_text(path, root)
        chunks = split_passages(text, passage_chars, overlap_chars) if text else []
        if not chunks:
            skipped += 1
            continue
        files += 1
        source = path.relative_to(root).as_posix()
        batch.extend((source, n, chunk) for n, chunk in enumerate(chunks))
        while len(batch) >= batch_size:
            next_id = _write(conn, embedder, batch[:batch_size], next_id)
            del batch[:batch_size]
    if batch:
        next_id = _write(conn, embedder, batch, next_id)
    conn.commit()
    return files, next_id - 1, skipped


def _write(
    conn: sqlite3.Connection, embedder: Embedder, rows: Sequence[tuple[str, int, str]], first: int
) -> int:
    import sqlite_vec

    vectors = embedder.embed([text for _, _, text in rows]).vectors
    if len(vectors) != len(rows) or any(len(v) != embedder.dimensions for v in vectors):
        raise VectorIndexError(f"embedder {embedder.model_id!r} returned malformed vectors")
    ids = range(first, first + len(rows))
    conn.executemany(
        "INSERT INTO passages (id, source, chunk, text) VALUES (?, ?, ?, ?)",
        [(i, *row) for i, row in zip(ids, rows, strict=True)],
    )
    conn.executemany(
        "INSERT INTO vec_passages (rowid, embedding) VALUES (?, ?)",
        [(i, sqlite_vec.serialize_float32(v)) for i, v in zip(ids, vectors, strict=True)],
    )
    return first + len(rows)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_index(index: Path, embedder: Embedder) -> sqlite3.Connection:
    """A read-only connection to `index`, checked to be built by `embedder`'s model."""
    if not index.is_file():
        raise VectorIndexError(f"index {index.name} does not exist; build it with `grifo index`")
    conn = connect(index, read_only=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except _db_errors() as exc:
        conn.close()
        raise VectorIndexError(f"{index.name} is not a grifo vector index ({exc})") from exc
    model_id, dims = meta.get("model_id"), meta.get("dimensions")
    if model_id != embedder.model_id or dims != str(embedder.dimensions):
        conn.close()
        raise IndexMismatchError(
            f"index {index.name} was built with model {model_id!r} ({dims} dimensions), "
            f"not {embedder.model_id!r} ({embedder.dimensions} dimensions); rebuild it with "
            "`grifo index` or configure the same embedding model"
        )
    return conn


def search(conn: sqlite3.Connection, vector: Sequence[float], top_k: int) -> list[Passage]:
    """The `top_k` passages closest to `vector`, closest first."""
    import sqlite_vec

    try:
        rows = conn.execute(
            "SELECT p.source, p.chunk, p.text, v.distance FROM"
            " (SELECT rowid, distance FROM vec_passages WHERE embedding MATCH ? AND k = ?) AS v"
            " JOIN passages AS p ON p.id = v.rowid ORDER BY v.distance, p.id",
            (sqlite_vec.serialize_float32(list(vector)), top_k),
        ).fetchall()
    except _db_errors() as exc:
        raise VectorIndexError(f"the index is unreadable: {exc}") from exc
    return [Passage(str(s), int(c), str(t), float(d)) for s, c, t, d in rows]
