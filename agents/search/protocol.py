"""ParlAI's raw-search-server protocol, both sides, as pure functions.

The client POSTs form-encoded `q=<query>&n=<int>` to exactly the configured URL and expects HTTP
200 with `{"response": [{"url": str, "title": str, "content": str}, ...]}`; `content` is
required. This server also takes a JSON body and `GET /search?q=` for a person with a browser.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Document:
    url: str
    title: str
    content: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger values are clamped, not refused, because ParlAI's
    client retries forever on any answer but 200 (ParlAI #4745)."""

    default_results: int = 5
    max_results: int = 20
    max_query_chars: int = 512


class BadRequest(ValueError):
    """Input that no retry can fix: answered 400 with this message."""


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {exc.start})") from None


def _form(text: str, what: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} has percent-escapes that are not valid UTF-8") from None
    return dict(pairs)


def parse_search_request(body: bytes, content_type: str, query_string: bytes,
                         limits: Limits = Limits()) -> tuple[str, int]:
    """(query, n) from a request's raw parts; body fields win over query-string fields."""
    fields: dict[str, object] = dict(_form(_decode(query_string, "query string"),
                                           "query string"))
    if body:
        text = _decode(body, "request body")
        if "json" in content_type.lower() or text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except RecursionError:
                raise BadRequest("the JSON body is nested too deeply") from None
            except ValueError as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise BadRequest("JSON body must be an object with 'q' and optional 'n'")
            fields.update(parsed)
        else:
            fields.update(_form(text, "form body"))
    if "q" not in fields:
        raise BadRequest("missing 'q' (the search query)")
    query = fields["q"]
    if not isinstance(query, str):
        raise BadRequest("'q' must be a string")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("'q' holds a lone UTF-16 surrogate: send valid Unicode") from None
    n = fields.get("n", limits.default_results)
    if isinstance(n, bool) or not isinstance(n, (int, str)):
        raise BadRequest("'n' must be an integer")
    try:
        n = int(n)
    except ValueError:
        raise BadRequest(f"'n' must be an integer, got {n!r}") from None
    return query[: limits.max_query_chars], min(max(n, 1), limits.max_results)


def search_response(documents: list[Document]) -> dict:
    return {"response": [d.to_json() for d in documents]}


def parse_search_response(body: object) -> list[Document]:
    """Documents from a server's answer; raises ValueError when it is not ParlAI's shape."""
    if not isinstance(body, dict) or not isinstance(body.get("response"), list):
        raise ValueError('expected {"response": [...]}')
    documents = []
    for i, item in enumerate(body["response"]):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ValueError(f"result {i} has no string 'content'")
        documents.append(Document(url=str(item.get("url") or ""),
                                  title=str(item.get("title") or ""),
                                  content=item["content"]))
    return documents


def parse_searxng_response(body: object, n: int) -> list[Document]:
    """A SearxNG `format=json` answer: {"results": [{"url", "title", "content"}, ...]}."""
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise ValueError('expected SearxNG JSON {"results": [...]}')
    documents = []
    for item in body["results"]:
        if isinstance(item, dict) and item.get("content"):
            documents.append(Document(url=str(item.get("url") or ""),
                                      title=str(item.get("title") or ""),
                                      content=str(item["content"])))
    return documents[:n]
