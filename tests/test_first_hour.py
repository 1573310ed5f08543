"""What a new user meets in the first hour: help texts that match the programs, hints that
work, explicit choices that win, and OpenAI's details."""

from __future__ import annotations

import argparse
import configparser
import importlib
import json
import re
import shutil

import pytest
import requests

from constants import DEFAULTS
from opt_serving.distributed import RankEnv
from opt_serving.runtime.startup import ServeOptions, prepare
from opt_serving.testing.server_process import REPO
from opt_serving.tokenizer import Tokenizer
from paths import ASSETS
from reshard.core import default_output_dir


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(p.strip() for p in line.split("=")) for line in lines)


def parsers_of(target: str) -> list[argparse.ArgumentParser]:
    module = importlib.import_module(target.split(":")[0])
    roots = module.all_parsers() if hasattr(module, "all_parsers") else [module.build_parser()]
    out = []
    while roots:
        p = roots.pop()
        out.append(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                roots.extend(action.choices.values())
    return out


@pytest.mark.parametrize("script, target", sorted(console_scripts().items()))
def test_every_option_says_what_it_does_and_its_default(script, target):
    problems = []
    for parser in parsers_of(target):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or \
                    action.help == argparse.SUPPRESS:
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                problems.append(f"{name}: no help")
                continue
            has_default = action.default not in (None, False, [], argparse.SUPPRESS)
            if has_default and action.required is False and "default" not in action.help:
                problems.append(f"{name}: its default ({action.default!r}) is not said")
    assert not problems, "\n".join(problems)


def test_help_texts_hold_no_raw_markup():
    for target in console_scripts().values():
        for parser in parsers_of(target):
            assert "``" not in parser.format_help(), parser.prog


def test_opt_serve_help_lists_every_route_the_app_has():
    from opt_serving.server.cli import build_parser
    from opt_serving.server.routes import ROUTES

    text = build_parser().format_help()
    for route in ROUTES:
        for path in route.paths:
            assert path.replace("<engine_name>", "<e>") in text, path
    assert "demo-out/bb3-tiny/mp2" in text


def test_an_explicit_assets_folder_wins_over_files_beside_the_checkpoint(tmp_path,
                                                                         serve_checkpoints):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(serve_checkpoints[1], ckpt)
    (ckpt / "gpt2-vocab.json").write_text(json.dumps({"broken": 0}))
    (ckpt / "gpt2-merges.txt").write_text("#version: 0.2\n")
    options = ServeOptions(checkpoint=str(ckpt), constants=DEFAULTS, assets=str(ASSETS))
    _, tok = prepare(options, RankEnv(0, 1, 0, "127.0.0.1", 0, "single"))
    assert isinstance(tok, Tokenizer) and tok.decode(tok.encode("Hello")) == "Hello"


def test_consolidating_a_folder_writes_beside_it(tmp_path):
    for name in ("mp8", "opt175b"):
        (tmp_path / name).mkdir()
    assert default_output_dir([str(tmp_path / "mp8")], 1) == tmp_path / "mp1"
    assert default_output_dir([str(tmp_path / "mp8") + "/"], 2) == tmp_path / "mp2"
    assert default_output_dir([str(tmp_path / "opt175b")], 8) == tmp_path / "opt175b-mp8"
    assert default_output_dir([str(tmp_path / "mp8" / "reshard.pt")], 1) == \
        tmp_path / "mp8" / "mp1"  # metaseq's virtual path: a file, as before


# -- OpenAI's details ---------------------------------------------------------------------------

def test_a_model_the_server_does_not_serve_is_404(server, serve_checkpoints):
    r = server.post("/v1/completions", {"prompt": "Hi", "model": "gpt-4", "max_tokens": 1})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["message"] == "The model `gpt-4` does not exist."
    assert (err["param"], err["code"]) == ("model", "model_not_found")
    (served,) = server.get("/v1/models").json()["data"]
    folder = serve_checkpoints[1].name
    for name in (served["id"], folder):
        r = server.post("/v1/completions", {"prompt": "Hi", "model": name, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == name
    # metaseq's route takes any model name, as metaseq does (ParlAI sends none).
    assert server.post("/completions", {"prompt": "Hi", "model": "gpt-4",
                                        "max_tokens": 1}).status_code == 200


def _events(server, body: dict) -> list:
    r = requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]


def test_stream_options_include_usage_sends_a_last_usage_chunk(server):
    body = {"prompt": ["Hello there", "Hi"], "max_tokens": 5, "min_tokens": 5,
            "temperature": 0, "stream": True, "n": 2}
    plain = _events(server, body)
    assert all("usage" not in e for e in plain)
    events = _events(server, {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert all(e["usage"] is None for e in chunks) and last["choices"] == []
    whole = server.post("/v1/completions", {k: v for k, v in body.items()
                                            if k != "stream"}).json()
    assert last["usage"] == whole["usage"]
    assert last["usage"]["completion_tokens"] == 2 * 2 * 5
    assert [c["choices"][0]["text"] for c in chunks] == [c["choices"][0]["text"] for c in plain]
    r = server.post("/v1/completions", {"prompt": "Hi", "stream_options":
                                        {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_a_wrong_method_is_counted_as_unmatched_as_the_help_says(server):
    assert server.get("/tokenize").status_code == 405
    metrics = server.get("/metrics").text
    assert re.search(r'opt_serve_http_requests_total\{route="unmatched",status="405"\} '
                     r'[1-9]', metrics)
    assert "'unmatched'" in metrics
