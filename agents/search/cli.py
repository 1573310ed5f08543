"""`opt-search-server`: build a local search index, or serve ParlAI's raw-search protocol.

    opt-search-server index --index kb.sqlite docs/          # once (again after edits)
    opt-search-server --index kb.sqlite --port 8080          # BB3: --raw-search-server :8080
    opt-search-server --upstream http://searx:8888 --upstream-kind searxng --port 8080
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from agents.search.protocol import Limits

_SERVE_EPILOG = """\
To build the index first:  opt-search-server index --index kb.sqlite PATHS...
(.txt, .md, .html and .jsonl files with {"url", "title", "content"} per line; re-indexing a
changed file replaces its rows, unchanged files are skipped).

Protocol (ParlAI's raw search server): POST / with form fields q and n, or a JSON body
{"q": ..., "n": ...}, answers {"response": [{"url", "title", "content"}, ...]}.
GET /search?q=...&n=... does the same for a browser; GET /healthz reports the backend."""


def _index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opt-search-server index",
        description="Build or update a SQLite FTS5 (BM25) index from local files.")
    p.add_argument("--index", required=True, help="the index file to create or update")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="files or folders (.txt, .md, .html, .jsonl; folders are recursed)")
    p.add_argument("--chunk-words", type=int, default=200,
                   help="split long text files into passages of about this many words "
                        "(default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opt-search-server", epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a raw search server for BlenderBot 3 (ParlAI protocol), from a "
                    "local index or by forwarding to a real web search.")
    p.add_argument("--index", help="index built by `opt-search-server index`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8080,
                   help="TCP port to listen on (default %(default)s; 0 picks a free one)")
    p.add_argument("--upstream", metavar="URL",
                   help="forward queries to this search service instead of the index")
    p.add_argument("--upstream-kind", choices=("parlai", "searxng"), default="parlai",
                   help="parlai: another raw search server; searxng: its /search?format=json "
                        "(default %(default)s)")
    p.add_argument("--upstream-timeout", type=float, default=10.0, metavar="S",
                   help="seconds before an upstream query fails with a 502 (default "
                        "%(default)s)")
    p.add_argument("--max-results", type=int, default=20,
                   help="cap on the n a client asks for (default %(default)s)")
    p.add_argument("--max-query-chars", type=int, default=512,
                   help="longer queries are cut to this length (default %(default)s)")
    p.add_argument("--threads", type=int, default=4,
                   help="waitress worker threads (default %(default)s)")
    return p


def all_parsers() -> list[argparse.ArgumentParser]:
    """Every parser of this command (for the help-text test)."""
    return [_serve_parser(), _index_parser()]


def _run_index(args: argparse.Namespace) -> int:
    from agents.search.index import index_paths

    try:
        stats = index_paths(args.index, args.paths, progress=not args.no_progress,
                            chunk_words=args.chunk_words)
    except (OSError, ValueError, sqlite3.Error) as exc:
        print(f"opt-search-server index: {exc}", file=sys.stderr)
        return 1
    for reason in stats.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"{args.index}: {stats.added} new, {stats.updated} updated, {stats.unchanged} "
          f"unchanged files; {stats.documents} documents written")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from agents.search.server import (SqliteBackend, UpstreamBackend, UpstreamConfig,
                                      create_app, serve)

    if not args.index and not args.upstream:
        print("opt-search-server: give --index kb.sqlite (build it with `opt-search-server "
              "index`) or --upstream URL", file=sys.stderr)
        return 2
    try:
        if args.upstream:
            backend = UpstreamBackend(UpstreamConfig(args.upstream, args.upstream_kind,
                                                     args.upstream_timeout), args.threads)
        else:
            backend = SqliteBackend(args.index)
    except (OSError, ValueError, sqlite3.Error) as exc:
        print(f"opt-search-server: {exc}", file=sys.stderr)
        return 1
    limits = Limits(max_results=args.max_results, max_query_chars=args.max_query_chars)
    app = create_app(backend, limits)
    where = args.index if not args.upstream else f"{args.upstream_kind} {args.upstream}"
    print(f"opt-search-server: {where} on http://{args.host}:{args.port}", file=sys.stderr,
          flush=True)
    try:
        serve(app, args.host, args.port, args.threads)
    except OSError as exc:
        print(f"opt-search-server: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["index"]:
        return _run_index(_index_parser().parse_args(argv[1:]))
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    return _run_serve(_serve_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
