"""Real HTTP servers and subprocesses on 127.0.0.1 for the agent and search-server tests.

`ScriptedServer` answers each request with whatever its `answer` function returns (a slow
server, an HTML error page, a malformed search result, ...) and records what it was sent;
`forward(url)` makes it a recording proxy in front of a real server. The fixtures that start and
stop these live in conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from opt_serving.distributed import free_port  # noqa: F401 - re-exported for the tests
from opt_serving.testing.server_process import (  # noqa: F401 - SearchServerProcess likewise
    SearchServerProcess, child_env)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Request:
    index: int  # 1 for the first request the server received
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


# (status, content type, body[, delay in seconds[, extra headers]])
Answer = tuple
Answerer = Callable[[Request], Answer]


def json_answer(body: object, status: int = 200, delay_s: float = 0.0) -> Answer:
    return status, "application/json", json.dumps(body), delay_s


class ScriptedServer:
    """A threaded HTTP server whose answer to each request is `answer(request)`.

    `requests` lists what it received and `answers` what it sent back (request, status, body),
    in arrival order. `answer` may be replaced while the server runs.
    """

    def __init__(self, answer: Answerer):
        self.answer = answer
        self.requests: list[Request] = []
        self.answers: list[tuple[Request, int, bytes]] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so that close() really takes it down.
            def handle_any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    req = Request(len(outer.requests) + 1, self.command, self.path,
                                  dict(self.headers), body)
                    outer.requests.append(req)
                status, ctype, payload, *rest = outer.answer(req)
                if rest and rest[0]:
                    time.sleep(rest[0])
                data = payload.encode() if isinstance(payload, str) else payload
                with lock:
                    outer.answers.append((req, status, data))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (rest[1] if len(rest) > 1 else {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting

            do_GET = do_POST = do_PUT = handle_any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = "http://" + self.address
        self.closed = False
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()


def forward(target: str, timeout: float = 120.0) -> Answerer:
    """An answer function that passes the request on to `target` (same path, body and content
    type) and returns the real answer unchanged: a recording proxy."""
    session = requests.Session()

    def answer(req: Request) -> Answer:
        headers = {k: v for k, v in req.headers.items()
                   if k.lower() in ("content-type", "authorization")}
        got = session.request(req.method, target.rstrip("/") + req.path, data=req.body,
                              headers=headers, timeout=timeout)
        return got.status_code, got.headers.get("Content-Type", ""), got.content

    return answer


def run_module(module: str, *args: str, cwd: Path, timeout: float = 60.0,
               **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` to completion, the way a console script runs it. Output is
    decoded without newline translation: a random model's "\r" stays a "\r"."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env=child_env(**env), capture_output=True, timeout=timeout)
    done.stdout = done.stdout.decode("utf-8", errors="replace")
    done.stderr = done.stderr.decode("utf-8", errors="replace")
    return done


def safe_interactive(*args: str, cwd: Path, timeout: float = 90.0,
                     **env: str) -> subprocess.CompletedProcess:
    return run_module("agents.cli", *args, cwd=cwd, timeout=timeout, **env)


def search_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_module("agents.search.cli", *args, cwd=cwd)
