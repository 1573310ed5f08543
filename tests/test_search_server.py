"""opt-search-server: indexing, BM25 ranking, ParlAI's protocol, bad input, upstream forwarding,
and the agent's search client, against real server processes on 127.0.0.1."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.client import RetryPolicy
from agents.search import index as fts
from agents.search.client import SearchClient, SearchError
from agents.search.protocol import BadRequest, Limits, parse_search_request
from loopback import SearchServerProcess, free_port, json_answer
from loopback import search_cli as cli

KEYS = ["url", "title", "content"]

CORPUS = {
    "corgi.md": "# Corgis\n\nThe Pembroke Welsh Corgi is a herding dog breed from Wales.\n"
                "Corgis have short legs and herd cattle.\n",
    "worldcup.html": "<html><head><title>2022 FIFA World Cup</title><style>p {}</style></head>"
                     "<body><h1>Final</h1><p>Argentina won the 2022 World Cup in Qatar, "
                     "beating France on penalties.</p><script>var corgi = 1;</script>"
                     "</body></html>",
    "moon.txt": "Apollo 11\n\nApollo 11 landed the first humans on the Moon in July 1969.\n"
                "Neil Armstrong stepped onto the lunar surface.\n",
    "python.txt": "Python is a programming language created by Guido van Rossum.\n",
    "food.jsonl": "\n".join(json.dumps(d) for d in [
        {"url": "https://example.org/pizza", "title": "Pizza",
         "content": "Pizza comes from Naples in Italy.\nMargherita is a classic."},
        {"url": "https://example.org/sushi", "title": "Sushi",
         "content": "Sushi is a Japanese dish of vinegared rice."},
        {"title": "Tacos", "content": "Tacos are a traditional dish from Mexico."}]),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search")
    (folder / "docs").mkdir()
    for name, text in CORPUS.items():
        (folder / "docs" / name).write_text(text)
    first = cli("index", "--index", "kb.sqlite", "docs", cwd=folder)
    assert first.returncode == 0, first.stderr
    assert "5 new, 0 updated, 0 unchanged files; 7 documents written" in first.stdout
    assert "indexing: 100%" in first.stderr  # the progress bar
    again = cli("index", "--index", "kb.sqlite", "docs", "--no-progress", cwd=folder)
    assert "0 new, 0 updated, 5 unchanged files; 0 documents written" in again.stdout
    return folder


@pytest.fixture(scope="module")
def server(corpus):
    proc = SearchServerProcess("--index", "kb.sqlite", "--max-results", "3",
                         "--max-query-chars", "200", cwd=corpus)
    yield proc
    proc.stop()


def ask(url: str, **form) -> requests.Response:
    return requests.post(url, data=form, timeout=10)


@pytest.mark.parametrize("query, best", [
    ("who won the world cup in 2022", "2022 FIFA World Cup"),
    ("corgi herding dogs", "Corgis"),
    ("apollo moon landing", "Apollo 11"),
    ("where does pizza come from", "Pizza"),
    ("which language did Guido create", "python"),  # one line only: titled by file name
])
def test_bm25_ranks_the_matching_document_first(server, query, best):
    answer = ask(server.url, q=query, n=3)
    assert answer.status_code == 200
    results = answer.json()["response"]
    assert results[0]["title"] == best


def test_parlai_protocol_shapes(server):
    form = ask(server.url, q="Argentina penalties", n=1).json()
    assert list(form) == ["response"] and len(form["response"]) == 1
    doc = form["response"][0]
    assert list(doc) == KEYS and all(isinstance(doc[k], str) for k in KEYS)
    assert doc["content"].startswith("Final\n") and "Argentina won the 2022 World Cup" in doc[
        "content"]
    assert doc["url"].startswith("file://") and doc["url"].endswith("worldcup.html")
    as_json = requests.post(server.url, json={"q": "Argentina penalties", "n": 1}, timeout=5)
    browser = requests.get(server.url + "/search", params={"q": "Argentina penalties", "n": 1},
                           timeout=5)
    posted = requests.post(server.url + "/search", data={"q": "Argentina penalties", "n": 1},
                           timeout=5)
    assert as_json.json() == browser.json() == posted.json() == form
    taco = ask(server.url, q="tacos", n=1).json()["response"][0]
    assert taco["url"].endswith("food.jsonl#line-3")
    health = requests.get(server.url + "/healthz", timeout=5).json()
    assert health["status"] == "ok" and health["documents"] == 7


def test_html_scripts_styles_and_head_are_not_indexed(server):
    titles = [d["title"] for d in ask(server.url, q="corgi", n=3).json()["response"]]
    assert titles == ["Corgis"]


@pytest.mark.parametrize("query", ['"', 'AND(', 'corgi AND(', '"unbalanced', 'NEAR(a b',
                                   'title:corgi', '*', 'corgi*', '-corgi', '^corgi', 'a OR',
                                   '()', "'; DROP TABLE documents; --", "ümlaut café 東京"])
def test_fts_syntax_in_user_text_is_never_syntax(server, query):
    answer = ask(server.url, q=query, n=3)
    assert answer.status_code == 200 and isinstance(answer.json()["response"], list)


def test_caps_and_defaults(server):
    assert len(ask(server.url, q="the a of is in", n=1000).json()["response"]) == 3
    assert len(ask(server.url, q="the a of is in", n=0).json()["response"]) == 1
    # A long query is cut, not refused (ParlAI's client would retry a 4xx forever)...
    assert ask(server.url, q="corgi " + "zz " * 500).json()["response"][0]["title"] == "Corgis"
    # ...but a body past 64 KiB is not read at all.
    answer = requests.post(server.url, data={"q": "x" * 100_000}, timeout=10)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == 413
    assert ask(server.url, q="").json() == {"response": []}
    assert ask(server.url, q="zzqqxx").json() == {"response": []}


@pytest.mark.parametrize("body, ctype, message", [
    (b"q=caf\xe9", "application/x-www-form-urlencoded", "not valid UTF-8"),
    (b"q=%FF%FE", "application/x-www-form-urlencoded", "not valid UTF-8"),
    (b'{"q": "caf\xe9"}', "application/json", "not valid UTF-8"),
    (b"n=3", "application/x-www-form-urlencoded", "missing 'q'"),
    (b"q=corgi&n=three", "application/x-www-form-urlencoded", "'n' must be an integer"),
    (b'{"q": 5}', "application/json", "'q' must be a string"),
    (b'{"q": "corgi", "n": true}', "application/json", "'n' must be an integer"),
    (b'["corgi"]', "application/json", "JSON body must be an object"),
    (b'{"q": ', "application/json", "not valid JSON"),
    (b'{"q": "a", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "application/json",
     "nested too deeply"),
    (b'{"q": "a\\ud800"}', "application/json", "surrogate"),
])
def test_bad_input_is_a_400_with_a_json_message(server, body, ctype, message):
    answer = requests.post(server.url, data=body, headers={"Content-Type": ctype}, timeout=5)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_routes_answer_json(server):
    assert requests.get(server.url + "/nope", timeout=5).json()["error"]["code"] == 404
    assert requests.put(server.url, timeout=5).json()["error"]["code"] == 405
    assert requests.get(server.url + "/search?q=%FF", timeout=5).status_code == 400


def test_forwarding_to_another_parlai_server(server, corpus):
    forward = SearchServerProcess("--upstream", server.address, cwd=corpus)
    try:
        direct = ask(server.url, q="moon landing", n=2).json()
        assert ask(forward.url, q="moon landing", n=2).json() == direct
        health = requests.get(forward.url + "/healthz", timeout=5).json()
        assert health["backend"] == "upstream" and health["kind"] == "parlai"
    finally:
        forward.stop()


def test_upstream_failures_answer_502(corpus, scripted):
    upstream = scripted(None)
    forward = SearchServerProcess("--upstream", upstream.url, "--upstream-timeout", "0.5",
                                  cwd=corpus)
    try:
        for answer, words in [(json_answer({"response": []}, delay_s=3.0),
                               "no answer within 0.5s"),
                              (json_answer({"results": []}), "unexpected shape"),
                              (json_answer({"response": [{"title": "no content"}]}), "content"),
                              ((200, "text/html", "<html>oops</html>"), "non-JSON"),
                              (json_answer({"error": "boom"}, 500), "HTTP 500")]:
            upstream.answer = lambda r, answer=answer: answer
            start = time.monotonic()
            answer = ask(forward.url, q="corgi", n=2)
            assert answer.status_code == 502, words
            error = answer.json()["error"]
            assert error["type"] == "upstream_error" and words in error["message"], error
            assert time.monotonic() - start < 2.5
        upstream.close()  # now nobody listens there
        answer = ask(forward.url, q="corgi")
        assert answer.status_code == 502 and "refused" in answer.json()["error"]["message"]
    finally:
        forward.stop()


def test_searxng_upstream(corpus, scripted):
    upstream = scripted(lambda r: json_answer({"query": "corgi", "results": [
        {"url": "https://a.example/corgi", "title": "Corgi", "content": "A dog.",
         "engine": "x"},
        {"url": "https://b.example/empty", "title": "Empty", "content": ""},
        {"url": "https://c.example/wales", "title": "Wales", "content": "A country."},
        {"url": "https://d.example/more", "title": "More", "content": "More text."}]}))
    forward = SearchServerProcess("--upstream", upstream.url, "--upstream-kind", "searxng",
                                  cwd=corpus)
    try:
        results = ask(forward.url, q="corgi dogs", n=2).json()["response"]
        assert results == [{"url": "https://a.example/corgi", "title": "Corgi",
                            "content": "A dog."},
                           {"url": "https://c.example/wales", "title": "Wales",
                            "content": "A country."}]
        assert upstream.requests[-1].path == "/search?q=corgi+dogs&format=json"
    finally:
        forward.stop()


def test_reindexing_a_changed_file_replaces_its_rows(tmp_path):
    (tmp_path / "a.txt").write_text("Hamsters are small rodents.\n")
    (tmp_path / "b.md").write_text("# Owls\n\nOwls hunt at night.\n")
    index = tmp_path / "kb.sqlite"
    stats = fts.index_paths(index, [tmp_path / "a.txt", tmp_path / "b.md"], progress=False)
    assert (stats.added, stats.updated, stats.documents) == (2, 0, 2)
    (tmp_path / "a.txt").write_text("Gerbils are desert rodents.\n\nThey dig burrows.\n")
    stats = fts.index_paths(index, [tmp_path], progress=False, chunk_words=4)
    assert (stats.added, stats.updated, stats.unchanged, stats.documents) == (0, 1, 1, 2)
    conn = fts.connect_readonly(index)
    assert fts.search(conn, "hamsters", 5) == []
    found = fts.search(conn, "gerbils burrows", 5)
    assert sorted((d.url.rsplit("/", 1)[1], d.content) for d in found) == [
        ("a.txt#part-1", "Gerbils are desert rodents."), ("a.txt#part-2", "They dig burrows.")]
    assert fts.count_documents(conn) == 3
    # The FTS index agrees with its content table (no stale rows left behind).
    assert conn.execute("SELECT count(*) FROM documents_fts WHERE documents_fts MATCH "
                        "'hamsters'").fetchone()[0] == 0
    conn.close()


def test_index_cli_refuses_bad_paths(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "unsupported file type" in cli("index", "--index", "kb.sqlite", "data.csv",
                                          cwd=tmp_path).stderr
    assert "no such file" in cli("index", "--index", "kb.sqlite", "missing",
                                 cwd=tmp_path).stderr
    (tmp_path / "bad.jsonl").write_text('{"title": "no content"}\n')
    result = cli("index", "--index", "kb.sqlite", "bad.jsonl", cwd=tmp_path)
    assert result.returncode == 0 and "skipped: " in result.stderr
    served = cli("--index", "missing.sqlite", cwd=tmp_path)
    assert served.returncode == 1 and "opt-search-server index" in served.stderr


@given(st.text(max_size=80))
@settings(max_examples=150, deadline=None)
def test_no_user_text_breaks_the_fts_query(text):
    conn = sqlite3.connect(":memory:")
    conn.executescript(fts._SCHEMA)
    conn.execute("INSERT INTO documents (source, url, title, content) VALUES ('s', 'u', 't', "
                 "'some words here')")
    conn.execute("INSERT INTO documents_fts (rowid, title, content) VALUES (1, 't', "
                 "'some words here')")
    assert isinstance(fts.search(conn, text, 3), list)


def test_request_parsing_rules():
    limits = Limits(default_results=5, max_results=10, max_query_chars=8)
    assert parse_search_request(b"q=hello+world&n=3", "", b"", limits) == ("hello wo", 3)
    assert parse_search_request(b"", "", b"q=x", limits) == ("x", 5)
    assert parse_search_request(b'{"q": "x", "n": "50"}', "application/json", b"n=1",
                                limits) == ("x", 10)
    with pytest.raises(BadRequest):
        parse_search_request(b"", "", b"q=%C3%28", limits)


def test_search_client_against_the_server(server):
    client = SearchClient(server.address)
    docs = client.search("Argentina world cup", n=2)
    assert docs[0].title == "2022 FIFA World Cup" and len(docs) <= 2
    assert client.search("zzqqxx") == []


def test_search_client_failures_are_quick_and_named(scripted):
    port = free_port()
    client = SearchClient(f"127.0.0.1:{port}", RetryPolicy(timeout_s=1.0, max_retries=1,
                                                          backoff_s=0.05))
    start = time.monotonic()
    with pytest.raises(SearchError, match=f"http://127.0.0.1:{port}.*refused"):
        client.search("corgi")
    assert time.monotonic() - start < 2
    upstream = scripted(lambda r: json_answer({"results": [{"content": "x"}]}))
    with pytest.raises(SearchError, match="malformed"):
        SearchClient(upstream.url).search("corgi")
    upstream.answer = lambda r: json_answer({"response": []}, delay_s=2.0)
    with pytest.raises(SearchError, match="no answer within 0.3s"):
        SearchClient(upstream.url, RetryPolicy(timeout_s=0.3, max_retries=0)).search("x")
