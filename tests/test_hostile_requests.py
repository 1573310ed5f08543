"""Hostile requests and clients (issue 8, classes 11-14): numbers that would overflow are 400s
naming the field, a row that still goes non-finite fails only its request, every bad body is
JSON, trickling clients cannot lock others out, and /metrics counts every outcome."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
import torch

from constants import DEFAULTS
from opt_serving.model import KVCache
from opt_serving.server.app import Service, create_app
from opt_serving.runtime.engine import Engine
from opt_serving.protocol import EngineError
from opt_serving.decoding.scheduler import Scheduler
from opt_serving.protocol import parse_request
from opt_serving.runtime.runner import ModelRunner
from opt_serving.runtime.ranks import Control

# -- 11. numbers the arithmetic cannot hold ---------------------------------------------------

OVERFLOWING = [
    ("temperature", 1e-30), ("temperature", 1e300), ("temperature", 10**400),
    ("alpha_frequency", 1e300), ("presence_penalty", -1e30), ("alpha_presence_src", 1e39),
    ("top_k", 10**30), ("seed", 10**30), ("alpha_src_penalty_end_idx", -10**30),
    ("lambda_decay", -1e300), ("top_p", -1e300),
]


@pytest.mark.parametrize("field,value", OVERFLOWING)
def test_overflowing_options_are_400_naming_the_field(server, field, value):
    raw = '{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field, value)
    r = server.post("/completions", data=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


POISON = 777  # a prompt holding this id makes the scripted model's scores NaN for its row


class PoisoningRunner(ModelRunner):
    """The real model, except that rows fed the POISON id come out NaN (a model whose
    numbers blow up on one input), as fp16 overflow would."""

    def run(self, work):
        logits = super().run(work)  # (S, V) at the packed rows work.select
        start = 0
        for n in work.lengths.tolist():  # each sequence's packed rows start .. start + n - 1
            if (work.tokens[start:start + n] == POISON).any():
                logits[(work.select >= start) & (work.select < start + n)] = float("nan")
            start += n
        return logits


@pytest.fixture
def inproc(reference, tiny_cfg):
    """An engine on the served weights with the poisoning runner, and its Flask app."""
    model, tok = reference
    cache = KVCache(tiny_cfg, num_blocks=128, block_size=16, dtype=torch.float32, device="cpu")
    engine = Engine(runner=PoisoningRunner(model, cache, torch.device("cpu")),
                    control=Control(1, 10.0), scheduler=Scheduler(
                        num_blocks=128, block_size=16, max_seqs=8, max_queued=16,
                        step_tokens=512, max_seq_len=256), tokenizer=tok,
                    request_timeout_s=60.0).start()
    app = create_app(Service(engine=engine, tokenizer=tok, limits=DEFAULTS, model_name="t"))
    yield engine, app, tok
    engine.shutdown()


def _run(engine, tok, body):
    req = parse_request(body)
    return engine.submit(req, [tok.encode(p) if isinstance(p, str) else p for p in req.prompts])


def test_a_non_finite_row_fails_only_its_request(inproc):
    engine, _, tok = inproc
    normal = {"prompt": "Hello there", "max_tokens": 40, "temperature": 0.8, "seed": 3,
              "stream": True}
    alone = [d.text for d in _run(engine, tok, normal).stream()]
    handle = _run(engine, tok, normal)
    stream = handle.stream()
    first = [next(stream).text]  # the normal request is decoding now
    steps = engine.stats.steps
    hostile = _run(engine, tok, {"prompt": [5, POISON, 6], "max_tokens": 4})
    with pytest.raises(EngineError) as e:
        hostile.result()
    assert e.value.status == 500 and "not finite" in str(e.value)
    together = first + [d.text for d in stream]
    assert together == alone
    assert engine.stats.batches_failed == 0 and engine.stats.steps > steps


# -- 12. every bad body is a JSON 4xx ----------------------------------------------------------

@pytest.mark.parametrize("raw,status,param", [
    (b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    (b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt"),
    (b'{"prompt": "a", "stop": ["\\ud83d"]}', 400, "stop"),
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "max_tokens"),
    (b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413, None),
])
def test_bad_bodies_are_json(server, raw, status, param):
    r = server.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["param"] == param


def _raw_http(url: str, head: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(body)


@pytest.mark.parametrize("head,status", [
    (b"POST /completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    # Just past waitress's 256 KiB: the server reads all of it, so its close is no reset.
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 << 10) + b"\r\n\r\n", 431),
])
def test_errors_before_the_app_are_json_too(server, head, status):
    got, body = _raw_http(server.url, head)
    assert got == status and body["error"]["type"] == "invalid_request_error"
    assert server.get("/healthz").ok


# -- 13. slow clients -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(serve_checkpoints):
    from server_helpers import SERVER_ARGS, ServerProcess

    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[1]), *SERVER_ARGS,
                         "--read-timeout", "2", "--threads", "16")
    yield proc
    proc.stop()


def test_trickling_clients_cannot_lock_others_out(strict_server):
    host, port = strict_server.url.rsplit("/", 1)[-1].split(":")
    slow = []
    for _ in range(300):  # three times waitress's default connection limit
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
    stop = threading.Event()

    def trickle():  # one byte per connection every 0.3 s: never silent, never done
        while not stop.is_set():
            for s in slow:
                try:
                    s.send(b"a")
                except OSError:
                    pass
            time.sleep(0.3)
    threading.Thread(target=trickle, daemon=True).start()
    try:
        started = time.monotonic()
        r = strict_server.post("/completions", {"prompt": "Hello", "max_tokens": 4}, timeout=20)
        assert r.ok and time.monotonic() - started < 5.0
        # The read deadline (2 s here) disconnects every trickling client.
        deadline = time.monotonic() + 15
        closed = 0
        while time.monotonic() < deadline and closed < len(slow):
            closed = 0
            for s in slow:
                s.settimeout(0.01)
                try:
                    closed += s.recv(1) == b""
                except (socket.timeout, BlockingIOError):
                    pass
                except OSError:
                    closed += 1
            time.sleep(0.2)
        assert closed == len(slow)
    finally:
        stop.set()
        for s in slow:
            s.close()


# -- 14. /metrics counts every outcome ---------------------------------------------------------

def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_every_status_and_stream_end(strict_server):
    def scrape():
        return strict_server.get("/metrics").text

    before = scrape()
    strict_server.post("/completions", {"prompt": ""})  # 400
    strict_server.get("/nowhere")  # 404
    _raw_http(strict_server.url, b"POST /completions HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: abc\r\n\r\n")  # 400 before the app
    with requests.post(strict_server.url + "/v1/completions", json={
            "prompt": "Hi", "max_tokens": 400, "stream": True}, stream=True, timeout=20) as r:
        next(r.iter_lines())  # then hang up mid-stream
    cancelled = _metric(before, "opt_serve_streams_ended_total", outcome="cancelled")
    assert strict_server.wait_for(lambda: _metric(
        scrape(), "opt_serve_streams_ended_total", outcome="cancelled") > cancelled, timeout=20)
    after = scrape()
    for labels in ({"route": "/completions", "status": "400"},
                   {"route": "unmatched", "status": "404"},
                   {"route": "unparsed", "status": "400"}):
        assert _metric(after, "opt_serve_http_requests_total", **labels) == \
            _metric(before, "opt_serve_http_requests_total", **labels) + 1, labels
    assert _metric(after, "opt_serve_requests_total", api="metaseq", status="400") >= 1


def test_a_stream_that_fails_is_counted(inproc):
    _, app, _ = inproc
    client = app.test_client()
    r = client.post("/v1/completions", json={"prompt": [POISON], "max_tokens": 3,
                                             "stream": True})
    assert b'"generation_failed"' in r.data and r.data.endswith(b"data: [DONE]\n\n")
    text = client.get("/metrics").data.decode()
    assert _metric(text, "opt_serve_streams_ended_total", outcome="error") == 1
    assert _metric(text, "opt_serve_requests_total", api="openai", status="500") == 1
