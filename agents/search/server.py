"""The HTTP side of opt-search-server: a Flask app over a search backend, served by waitress.

Every answer is JSON, errors included: ParlAI's client retries forever on anything that is not
a 200 JSON answer, so a bad request gets a 400 with a message a person can read and a broken
upstream a 502, never an HTML page or a 500 from a query the engine could not parse.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from agents.client import RetryPolicy, ServiceError, make_session, normalise_url, request_json
from agents.search import index as fts
from agents.search.client import SearchClient
from agents.search.protocol import (BadRequest, Document, Limits, parse_search_request,
                                    parse_searxng_response, search_response)

log = logging.getLogger("opt-search-server")
MAX_BODY_BYTES = 64 * 1024
UPSTREAM_KINDS = ("parlai", "searxng")


class UpstreamError(RuntimeError):
    """The forwarding backend's upstream failed: answered 502."""


class Backend(Protocol):
    def search(self, query: str, n: int) -> list[Document]: ...

    def health(self) -> dict: ...


class SqliteBackend:
    """The local FTS5 index; one read-only connection per server thread, opened on first use
    (SQLite connections are not shared across threads)."""

    def __init__(self, index_path: str | Path):
        self.path = Path(index_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no index (build one with "
                                    f"`opt-search-server index --index {self.path} DOCS...`)")
        self._local = threading.local()
        self.health()  # fails now, not on the first query, if the file is not an index

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = fts.connect_readonly(self.path)
        return conn

    def search(self, query: str, n: int) -> list[Document]:
        return fts.search(self._conn(), query, n)

    def health(self) -> dict:
        return {"backend": "sqlite", "index": str(self.path),
                "documents": fts.count_documents(self._conn())}


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    kind: str = "parlai"  # another ParlAI-protocol server, or a SearxNG instance's JSON API
    timeout_s: float = 10.0

    def __post_init__(self):
        if self.kind not in UPSTREAM_KINDS:
            raise ValueError(f"upstream kind must be one of {UPSTREAM_KINDS}")


class UpstreamBackend:
    """Forwards each query to a real web search, with a timeout and no retry (the agent's own
    client decides whether to try again)."""

    def __init__(self, config: UpstreamConfig, threads: int = 4):
        self.config = config
        self.url = normalise_url(config.url)
        self._policy = RetryPolicy(timeout_s=config.timeout_s,
                                   connect_timeout_s=min(config.timeout_s, 3.0), max_retries=0)
        self._session = make_session(threads)
        # Another ParlAI-protocol server: the agent's own search client speaks it.
        self._parlai = SearchClient(config.url, self._policy, pool_size=threads)

    def search(self, query: str, n: int) -> list[Document]:
        try:
            if self.config.kind == "parlai":
                return self._parlai.search(query, n)
            url = self.url if self.url.endswith("/search") else self.url + "/search"
            body = request_json(self._session, "GET", url, self._policy,
                                params={"q": query, "format": "json"})
            return parse_searxng_response(body, n)
        except ServiceError as exc:
            raise UpstreamError(f"upstream {self.config.kind} search failed: {exc}") from None
        except ValueError as exc:
            raise UpstreamError(f"upstream {self.config.kind} search at {self.url} answered "
                                f"an unexpected shape: {exc}") from None

    def health(self) -> dict:
        return {"backend": "upstream", "kind": self.config.kind, "upstream": self.url}


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    return jsonify({"error": {"message": message, "type": kind, "code": status}}), status


def create_app(backend: Backend, limits: Limits = Limits()) -> Flask:
    app = Flask("opt-search-server")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False

    def answer():
        try:
            query, n = parse_search_request(request.get_data(cache=False),
                                            request.content_type or "",
                                            request.query_string, limits)
        except BadRequest as exc:
            return _error(400, str(exc))
        try:
            documents = backend.search(query, n)
        except UpstreamError as exc:
            log.warning("%s", exc)
            return _error(502, str(exc), "upstream_error")
        return jsonify(search_response(documents))

    # ParlAI posts to exactly the URL it was given: the root, or /search for those who add it.
    app.add_url_rule("/", "post_root", answer, methods=["POST"])
    app.add_url_rule("/search", "search", answer, methods=["GET", "POST"])

    @app.get("/")
    def usage():
        return jsonify({"service": "opt-search-server",
                        "usage": "POST / with form fields q and n (ParlAI protocol), a JSON "
                                 "body {\"q\", \"n\"}, or GET /search?q=...&n=...",
                        "health": "/healthz"})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok", **backend.health()})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("search failed")
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    return app


def serve(app: Flask, host: str, port: int, threads: int = 4) -> None:
    import waitress

    # waitress: a production WSGI server (metaseq served on Werkzeug's development server).
    waitress.serve(app, host=host, port=port, threads=threads, ident="opt-search-server",
                   _quiet=True)

