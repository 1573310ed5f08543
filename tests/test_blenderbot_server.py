"""``opt-serve --model-file`` (BlenderBot 1), the real server in its own process on loopback:
completions and chat completions give ParlAI's recorded replies and n-best lists, /tokenize
gives ParlAI's history vectors for messages, bad bodies get 400s that name the field, and
``safe_interactive -mf --server`` chats through it as it does in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opt_serving.testing.server_process import REPO, ServerProcess, child_env

FIXTURES = Path(__file__).parent / "fixtures" / "blenderbot1"
RECORDED = json.loads((FIXTURES / "parlai_1.7.2.json").read_text())
RECIPE = dict(inference="beam", beam_size=10, beam_min_length=20, beam_block_ngram=3,
              beam_context_block_ngram=3, beam_length_penalty=0.65, max_tokens=32)
TURNS = [t for c in RECORDED["conversations"] for t in c["turns"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny ParlAI model with the history options it was recorded with in its .opt (as a
    zoo file carries them), under a ParlAI data folder."""
    data = tmp_path_factory.mktemp("parlai")
    where = data / "models" / "blender" / "tiny"
    shutil.copytree(FIXTURES / "tiny", where)
    opt = json.loads((where / "model.opt").read_text())
    opt.update({k: RECORDED["opt"][k] for k in ("delimiter", "history_add_global_end_token",
                                                "text_truncate")})
    (where / "model.opt").write_text(json.dumps(opt))
    proc = ServerProcess("--model-file", "zoo:blender/tiny/model", "--datapath", str(data),
                         "--device", "cpu", "--max-batch-size", "3")
    proc.data = data
    yield proc
    proc.stop()


def test_completions_give_parlais_replies_and_n_best_lists(server):
    first = TURNS[0]
    r = server.post("/v1/completions", {"prompt": first["message"], **RECIPE})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == first["reply"] and choice["finish_reason"] == "stop"
    assert choice["token_ids"] == first["best"][1:-1]
    assert [h["token_ids"] for h in choice["nbest"]] == [h["tokens"][1:-1]
                                                          for h in first["nbest"]]
    assert [h["rescored"] for h in choice["nbest"]] == pytest.approx(
        [h["score"] for h in first["nbest"]], abs=1e-5)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(first["history_vec"])
    assert usage["completion_tokens"] == len(first["best"]) - 1  # the end counts
    # Every recorded turn at once, as token ids, from concurrent clients: batched together.
    with ThreadPoolExecutor(len(TURNS)) as pool:
        answers = list(pool.map(lambda t: server.post("/v1/completions", {
            "prompt": t["history_vec"], **RECIPE}), TURNS))
    for turn, a in zip(TURNS, answers):
        assert a.status_code == 200, a.text
        assert a.json()["choices"][0]["token_ids"] == turn["best"][1:-1]


def test_chat_completions_build_parlais_history_from_messages(server):
    conv = RECORDED["conversations"][0]
    persona = [line.removeprefix("your persona: ") for line in conv["persona"].split("\n")]
    messages = [{"role": "system", "content": "\n".join(persona)}]
    for t, turn in enumerate(conv["turns"]):
        messages.append({"role": "user", "content": turn["message"].split("\n")[-1]
                         if t == 0 else turn["message"]})
        tok = server.post("/tokenize", {"messages": messages})
        assert tok.status_code == 200, tok.text
        assert tok.json()["tokens"] == turn["history_vec"]
        r = server.post("/v1/chat/completions", {"messages": messages, **RECIPE})
        assert r.status_code == 200, r.text
        reply = r.json()["choices"][0]["message"]
        assert reply == {"role": "assistant", "content": turn["reply"]}
        messages.append(reply)


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": "hi", "beam_sise": 3}, "beam_sise"),
    ("/v1/completions", {"prompt": "hi", "beam_size": "ten"}, "beam_size"),
    ("/v1/completions", {"prompt": "hi", "inference": "beam", "beam_size": 11}, "beam_size"),
    ("/v1/completions", {"prompt": "hi", "inference": "topk"}, "inference"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"},
                                           {"role": "user", "content": "y"}]}, "messages"),
])
def test_bad_bodies_are_400s_naming_the_field(server, path, body, field):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_an_unserved_model_is_404_and_health_routes_answer(server):
    r = server.post("/v1/completions", {"prompt": "hi", "model": "blender_3B"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert server.get("/readyz").json()["status"] == "ready"
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert server.post("/completions", {"prompt": "hi"}).status_code == 404  # OPT's route
    assert server.metric("opt_serve_steps_total") > 0
    assert server.metric("opt_serve_kv_blocks_total") == 3  # group slots (--max-batch-size)


def test_safe_interactive_chats_through_the_server_as_in_process(server, tmp_path):
    """The same chat (persona, three turns) with the model in-process and through the chat
    route: the same replies (both with the model's own .opt options)."""
    conv = RECORDED["conversations"][0]
    script = [t["message"].split("\n")[-1] if i == 0 else t["message"]
              for i, t in enumerate(conv["turns"])] + ["[DONE]", "hello there"]
    (tmp_path / "s.txt").write_text("\n".join(script) + "\n")
    persona = [line.removeprefix("your persona: ") for line in conv["persona"].split("\n")]
    args = ["-mf", "zoo:blender/tiny/model", "--datapath", str(server.data), "--safety",
            "none", "--script", str(tmp_path / "s.txt")]
    args += [a for p in persona for a in ("--persona", p)]

    def chat(*extra):
        done = subprocess.run([sys.executable, "-m", "agents.cli", *args, *extra],
                              capture_output=True, text=True, cwd=REPO, env=child_env(),
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return [x for x in done.stdout.splitlines() if x.startswith("[TransformerGenerator]")]

    here, there = chat(), chat("--server", server.url)
    assert len(here) == len(script) - 1 and there == here
