"""Hardening, round 2: the new engine surfaces under hostile input (limits, ``/tokenize``,
start-up flags, ``LLM``'s inputs). Each test goes at the root of the behaviour."""

from __future__ import annotations

import dataclasses
import json

import pytest

from constants import DEFAULTS
from opt_serving.config import get_preset
from opt_serving.protocol import EngineError, RequestError, parse_body
from opt_serving.runtime.naming import python_name
from opt_serving.runtime.sizing import CacheLayout, TooSmall, cache_bytes, effective_limits
from opt_serving.server.app import create_app
from opt_serving.server.cli import main as serve_main
from opt_serving.server.service import Service
from opt_serving.tokenizer import Tokenizer, locate_assets
from paths import ASSETS


class SpyTokenizer:
    """The real tokenizer, recording what is encoded; ``encode`` (which holds the interpreter
    lock for the whole text) is not to be used on a request path."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.batches = tok, []

    def encode(self, text):
        raise AssertionError("encode holds the interpreter lock: use encode_batch")

    def encode_batch(self, texts):
        self.batches.append([len(t) for t in texts])
        return self.tok.encode_batch(texts)

    def __getattr__(self, name):
        return getattr(self.tok, name)


class RefusingEngine:
    """Takes the tokenised prompt ids and answers 503 (enough to see what reached it)."""

    ready, failure, stats = True, None, None

    def __init__(self):
        self.submitted = []

    def submit(self, request, ids):
        self.submitted.append(ids)
        raise EngineError(503, "no model here", code="not_ready")


@pytest.fixture
def app_and_spy():
    spy, engine = SpyTokenizer(Tokenizer(locate_assets(assets_dir=ASSETS))), RefusingEngine()
    limits = dataclasses.replace(DEFAULTS, max_seq_len=256, default_max_tokens=16)
    app = create_app(Service(engine=engine, tokenizer=spy, limits=limits, model_name="t"))
    return app.test_client(), spy, engine


def test_request_texts_leave_the_interpreter_lock_to_other_threads(app_and_spy):
    client, spy, engine = app_and_spy
    assert client.post("/tokenize", json={"prompt": "Hello there"}).status_code == 200
    assert client.post("/tokenize", json={"prompt": ["a", "b c"]}).status_code == 200
    assert client.post("/completions", json={"prompt": "Hello"}).status_code == 503
    assert client.post("/v1/completions", json={"prompt": ["x", "y"]}).status_code == 503
    assert spy.batches == [[11], [1, 3], [5], [1, 1]]  # all through encode_batch
    assert engine.submitted[0] == [spy.tok.encode("Hello")]


@pytest.mark.parametrize("route", ["/tokenize", "/completions", "/v1/completions"])
def test_a_text_no_sequence_can_hold_is_refused_without_encoding_it(app_and_spy, route):
    client, spy, _ = app_and_spy
    longest = 256 * spy.max_token_bytes  # no 256 tokens span more characters than this
    r = client.post(route, json={"prompt": ["ok", "a" * (longest + 1)]})
    assert r.status_code == 400, r.text
    err = r.get_json()["error"]
    assert err["param"] == "prompt" and "prompt[1]" in err["message"]
    assert "256 tokens" in err["message"] and "end of the text" in err["message"]
    assert spy.batches == []  # nothing was encoded
    # At the bound it is encoded (a completion is then cut from the left, as metaseq does).
    assert client.post(route, json={"prompt": "a" * longest}).status_code in (200, 503)
    assert spy.batches == [[longest]]


def test_a_multi_megabyte_tokenize_is_refused_and_the_server_serves_on(server):
    r = server.post("/tokenize", {"prompt": "a" * 4_000_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert server.get("/healthz").status_code == 200
    ok = server.post("/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


# -- one effective per-sequence limit ----------------------------------------------------------

def test_the_effective_limit_is_the_smallest_and_an_explicit_one_is_refused():
    cfg = get_preset("tiny-8h")
    big = CacheLayout(64, 16)  # 1024 tokens
    limits = effective_limits(dataclasses.replace(DEFAULTS, max_seq_len=256), cfg, big, True)
    assert limits.max_seq_len == 256
    # The default is cut to the model's positions, quietly.
    wide = dataclasses.replace(DEFAULTS, max_seq_len=cfg.max_positions + 100)
    assert effective_limits(wide, cfg, CacheLayout(1024, 16), False).max_seq_len == \
        cfg.max_positions
    with pytest.raises(TooSmall, match="positions"):
        effective_limits(wide, cfg, CacheLayout(1024, 16), True)
    # A cache smaller than the limit: refused, naming both flags (or both keywords).
    small = CacheLayout(8, 16)  # 128 tokens
    with pytest.raises(TooSmall) as err:
        effective_limits(dataclasses.replace(DEFAULTS, max_seq_len=256), cfg, small, True)
    assert "--max-seq-len 256" in str(err.value) and "--kv-tokens" in str(err.value)
    assert "--max-seq-len 128 or less" in str(err.value)
    with pytest.raises(TooSmall) as err:
        effective_limits(DEFAULTS, cfg, small, False, python_name)
    assert "max_seq_len=2048 (default)" in str(err.value) and "kv_tokens=" in str(err.value)
    # default_max_tokens follows a small model's positions down.
    short = dataclasses.replace(cfg, max_positions=20)
    tight = effective_limits(DEFAULTS, short, small, False)
    assert (tight.max_seq_len, tight.default_max_tokens) == (20, 18)


def test_every_surface_reports_the_same_limit(server):
    tokenize = server.post("/tokenize", {"prompt": "Hi"}).json()["max_model_len"]
    (model,) = server.get("/v1/models").json()["data"]
    assert tokenize == model["max_model_len"] == 512
    r = server.post("/completions", {"prompt": "Hi", "max_tokens": 600})
    assert r.status_code == 400 and "between 0 and 510" in r.json()["error"]["message"]
    r = server.post("/completions", {"prompt": [5] * 600, "max_tokens": 12, "temperature": 0})
    assert int(r.headers["X-Prompt-Truncated"]) == 600 - (512 - 12 - 1)


def _start(capsys, *argv: str) -> str:
    assert serve_main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("opt-serve: ") and "Traceback" not in err
    return " ".join(err.split())


def test_a_max_seq_len_the_cache_cannot_hold_is_refused_at_start(capsys, serve_checkpoints):
    msg = _start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]), "--assets",
                 str(ASSETS), "--kv-tokens", "128", "--max-seq-len", "256", "--port", "0")
    assert "--max-seq-len 256" in msg and "--kv-tokens" in msg


def test_a_cache_the_machine_cannot_hold_is_refused_before_allocating(capsys,
                                                                      serve_checkpoints):
    msg = _start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]), "--assets",
                 str(ASSETS), "--kv-tokens", "1000000000000", "--max-seq-len", "512",
                 "--port", "0")
    need = cache_bytes(get_preset("tiny-8h"), 10**12, 1, "fp32")
    assert "--kv-tokens 1000000000000" in msg and "bytes free" in msg
    assert f"needs {need:,} bytes" in msg


def test_a_block_larger_than_the_cache_names_the_block_size(capsys, serve_checkpoints):
    msg = _start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]), "--assets",
                 str(ASSETS), "--kv-tokens", "4096", "--kv-block-size", "100000",
                 "--port", "0")
    assert "--kv-block-size 100000" in msg and "4096 tokens" in msg


# -- a 5000-digit number -------------------------------------------------------------------------

@pytest.mark.parametrize("field, words", [
    ("max_tokens", "between 0 and 2046"), ("temperature", "between 0.0 and"),
    ("seed", "between"), ("logprobs", "between 0 and 20")])
def test_a_huge_integer_names_the_field_and_its_range(field, words):
    raw = b'{"prompt": "a", "' + field.encode() + b'": 1' + b"0" * 5000 + b"}"
    with pytest.raises(RequestError) as err:
        parse_body(raw)
    assert err.value.param == field and words in err.value.message
    assert "5001-digit integer" in err.value.message
    assert "sys." not in err.value.message and "4300" not in err.value.message


def test_a_huge_token_id_is_not_in_the_dictionary():
    with pytest.raises(RequestError) as err:
        parse_body(b'{"prompt": [5, -' + b"9" * 5000 + b"]}")
    assert err.value.param == "prompt" and "not in the dictionary" in err.value.message
    # Bodies without such numbers keep the fast path and their exact values.
    assert parse_body(json.dumps({"prompt": [5], "seed": 2**64 - 1}).encode()).sampling.seed \
        == 2**64 - 1
