"""Servers that lie or crawl (issue 8, classes 16-17): the agent's calls end at their deadline
whatever the server does, and every transport failure is a named agent error, never a
traceback. The servers here are raw sockets on loopback that misbehave on purpose."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from agents.client import CompletionsClient, CompletionsError, RetryPolicy
from agents.search.client import SearchClient, SearchError
from loopback import ROOT, json_answer, safe_interactive


class RawServer:
    """Accepts connections on loopback and hands each socket to ``behave(conn, port)``."""

    def __init__(self, behave):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.behave, self.stop = behave, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:  # closed under us: the test is over
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            conn.recv(65536)
            self.behave(conn, self.port)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def raw():
    servers = []

    def start(behave):
        servers.append(RawServer(behave))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def trickle(data: bytes, every_s: float = 0.1):
    def behave(conn, port):
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(every_s)
    return behave


SLOW_HEADERS = trickle(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 1000 + b"\r\n\r\n{}")
SLOW_BODY = trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000000\r\n\r\n" + b" " * 1000, every_s=0.05)


# -- 16. a deadline per call ------------------------------------------------------------------

@pytest.mark.parametrize("behave", [SLOW_HEADERS, SLOW_BODY], ids=["headers", "body"])
def test_a_trickling_server_is_cut_off_at_the_deadline(raw, behave):
    server = raw(behave)
    for client, error in ((CompletionsClient(server.url, RetryPolicy(timeout_s=1.0,
                                                                       max_retries=0)),
                           CompletionsError),
                          (SearchClient(server.url, RetryPolicy(timeout_s=1.0, max_retries=0)),
                           SearchError)):
        started = time.monotonic()
        with pytest.raises(error, match="server too slow: no answer within 1s"):
            if isinstance(client, SearchClient):
                client.search("corgi")
            else:
                client.complete_payload({"prompt": "hi"})
        assert time.monotonic() - started < 2.5


# -- 17. every transport error is an agent error ----------------------------------------------

def redirect_loop(conn, port):
    conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/completions\r\n"
                 "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())


def broken_chunks(conn, port):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")


def bad_gzip(conn, port):
    body = b"\x1f\x8b\x08\x00not really gzip at all"
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: "
                 b"gzip\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("behave,words", [
    (redirect_loop, "redirects in a loop"),
    (broken_chunks, "broken answer"),
    (bad_gzip, "broken answer"),
])
def test_transport_failures_are_named_errors(raw, behave, words):
    server = raw(behave)
    with pytest.raises(CompletionsError, match=words) as e:
        CompletionsClient(server.url, RetryPolicy(timeout_s=2, max_retries=1,
                                                  backoff_s=0.01)).complete_payload({})
    assert server.url in str(e.value)
    with pytest.raises(SearchError, match=words):
        SearchClient(server.url, RetryPolicy(timeout_s=2, max_retries=0)).search("q")


@pytest.mark.parametrize("url,words", [
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://[::1", "not a valid URL"),
    ("ftp://127.0.0.1:21", "only http:// and https://"),
])
def test_unusable_urls_are_refused_by_name(tmp_path, scripted, url, words):
    done = safe_interactive("--opt-server", url, "--script", "/dev/null", "--no-log",
                            "--memory-db", str(tmp_path / "m.sqlite"), cwd=ROOT)
    assert done.returncode == 2 and words in done.stderr and url in done.stderr
    assert "Traceback" not in done.stderr
    # As the search server, the same URL only turns search off; the chat goes on.
    opt = scripted(lambda r: json_answer({"choices": [{"text": " hello there"}]}))
    script = tmp_path / "lines.txt"
    script.write_text("Hi! Tell me about corgis.\n")
    done = safe_interactive("--opt-server", opt.url, "--raw-search-server", url, "--script",
                            str(script), "--no-log", "--safety", "none",
                            "--memory-db", str(tmp_path / "m.sqlite"), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "search is off" in done.stderr and words in done.stderr
    assert "Traceback" not in done.stderr
