"""The embedded search index: SQLite FTS5 with BM25 ranking, built from local files.

`documents` holds the rows (one per chunk of a file, or per line of a .jsonl file) and
`documents_fts` is an external-content FTS5 index over their title and text. `sources` remembers
each indexed file's SHA-256, so re-indexing skips unchanged files and replaces the rows of a
changed one. Queries never reach FTS5's query syntax raw: user text is reduced to its words,
each quoted as a phrase.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from agents.search.protocol import Document

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl")
# A passage per ~200 words: a long file as one document would drown in BM25's length norm.
CHUNK_WORDS = 200
MAX_QUERY_TERMS = 32
TITLE_WEIGHT, CONTENT_WEIGHT = 2.0, 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, documents INTEGER NOT NULL,
    indexed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, url TEXT NOT NULL, title TEXT NOT NULL,
    content TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS documents_source ON documents (source);
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(
    title, content, content='documents', content_rowid='id', tokenize='porter unicode61');
"""


@dataclass(frozen=True)
class IndexStats:
    added: int  # files seen for the first time
    updated: int  # files whose rows were replaced
    unchanged: int
    documents: int  # rows written in this run
    skipped: tuple[str, ...]  # files that produced no document, with the reason


def chunk_text(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Paragraphs (blank-line separated) grouped into passages of at most ~max_words words."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        n = len(para.split())
        if current and size + n > max_words:
            chunks.append("\n".join(current))
            current, size = [], 0
        if n > max_words:  # one huge paragraph: cut it by words
            words = para.split()
            for i in range(0, len(words), max_words):
                chunks.append(" ".join(words[i:i + max_words]))
            continue
        current.append(para)
        size += n
    if current:
        chunks.append("\n".join(current))
    return chunks


class _HTMLText(html.parser.HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "head"}
    _BREAK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
              "article", "pre", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title, self.parts, self._stack = "", [], []

    def handle_starttag(self, tag, attrs):
        self._stack.append(tag)
        if tag in self._BREAK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "title" in self._stack and not self.title:
            self.title = data.strip()
        elif not self._SKIP.intersection(self._stack):
            self.parts.append(data)


def html_to_text(markup: str) -> tuple[str, str]:
    """(title, visible text) of an HTML page; scripts, styles and the head are dropped."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
    return parser.title, re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip()


def _title_of(text: str, path: Path) -> str:
    """A Markdown heading, a short first line followed by more text, or the file's name."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("#"):
        return lines[0].lstrip("#").strip()
    if len(lines) > 1 and len(lines[0]) <= 80:
        return lines[0]
    return path.stem


def read_documents(path: Path, chunk_words: int = CHUNK_WORDS) -> list[Document]:
    """The documents of one file, by its suffix."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    uri = path.resolve().as_uri()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(item, dict) or not str(item.get("content") or "").strip():
                raise ValueError(f"{path}:{number}: needs a non-empty 'content'")
            docs.append(Document(url=str(item.get("url") or f"{uri}#line-{number}"),
                                 title=str(item.get("title") or ""),
                                 content=str(item["content"])))
        return docs
    if suffix in (".html", ".htm"):
        title, text = html_to_text(raw)
        title = title or path.stem
    else:
        text, title = raw, _title_of(raw, path)
    chunks = chunk_text(text, chunk_words)
    if len(chunks) == 1:
        return [Document(uri, title, chunks[0])]
    return [Document(f"{uri}#part-{i}", title, c) for i, c in enumerate(chunks, 1)]


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files to index: named files, and supported files anywhere under named folders."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*")
                                if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES))
        elif p.is_file():
            if p.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise ValueError(f"{p}: unsupported file type (use "
                                 f"{', '.join(SUPPORTED_SUFFIXES)})")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def open_index(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) an index for writing."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.executescript(_SCHEMA)
    return conn


def _delete_source(conn: sqlite3.Connection, source: str) -> None:
    # External-content FTS5 tables need the old values to remove a row from the index.
    conn.execute("INSERT INTO documents_fts (documents_fts, rowid, title, content) "
                 "SELECT 'delete', id, title, content FROM documents WHERE source = ?",
                 (source,))
    conn.execute("DELETE FROM documents WHERE source = ?", (source,))


def index_paths(index: str | Path, paths: Sequence[str | Path], *, progress: bool = True,
                chunk_words: int = CHUNK_WORDS) -> IndexStats:
    files = expand_paths(paths)
    added = updated = unchanged = written = 0
    skipped: list[str] = []
    conn = open_index(index)
    try:
        for path in tqdm(files, desc="indexing", unit="file", disable=not progress,
                         file=sys.stderr):
            source = str(path.resolve())
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            row = conn.execute("SELECT sha256 FROM sources WHERE path = ?", (source,)).fetchone()
            if row and row[0] == digest:
                unchanged += 1
                continue
            try:
                docs = read_documents(path, chunk_words)
            except ValueError as exc:
                skipped.append(str(exc))
                continue
            if not docs:
                skipped.append(f"{path}: no text")
            conn.execute("BEGIN IMMEDIATE")
            try:
                _delete_source(conn, source)
                for doc in docs:
                    cur = conn.execute("INSERT INTO documents (source, url, title, content) "
                                       "VALUES (?, ?, ?, ?)",
                                       (source, doc.url, doc.title, doc.content))
                    conn.execute("INSERT INTO documents_fts (rowid, title, content) "
                                 "VALUES (?, ?, ?)", (cur.lastrowid, doc.title, doc.content))
                conn.execute("INSERT OR REPLACE INTO sources (path, sha256, documents, "
                             "indexed_at) VALUES (?, ?, ?, ?)",
                             (source, digest, len(docs), time.time()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            written += len(docs)
            if row:
                updated += 1
            else:
                added += 1
    finally:
        conn.close()
    return IndexStats(added, updated, unchanged, written, tuple(skipped))


def fts_query(text: str, max_terms: int = MAX_QUERY_TERMS) -> str | None:
    """User text as an FTS5 query: its words, each a quoted phrase, OR-ed for BM25 to rank.

    Only letters and digits survive, so quotes, parentheses, AND/NEAR operators and column
    filters in the user's text are plain words to the engine, never syntax.
    """
    terms = list(dict.fromkeys(re.findall(r"[^\W_]+", text.lower())))[:max_terms]
    return " OR ".join(f'"{t}"' for t in terms) or None


def connect_readonly(path: str | Path, timeout_s: float = 10.0) -> sqlite3.Connection:
    """``timeout_s``: wait that long for a running `index` to release its write lock."""
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True,
                           timeout=timeout_s)


def search(conn: sqlite3.Connection, query: str, n: int) -> list[Document]:
    match = fts_query(query)
    if match is None:
        return []
    rows = conn.execute(
        "SELECT d.url, d.title, d.content FROM documents_fts JOIN documents d "
        "ON d.id = documents_fts.rowid WHERE documents_fts MATCH ? "
        f"ORDER BY bm25(documents_fts, {TITLE_WEIGHT}, {CONTENT_WEIGHT}) LIMIT ?",
        (match, n)).fetchall()
    return [Document(*row) for row in rows]


def count_documents(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM documents").fetchone()[0]
