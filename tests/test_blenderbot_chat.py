"""BlenderBot 1 from Python and in the chat (issue 20): ``LLM(PATH)`` for ParlAI files, zoo
paths and HF folders with ParlAI's option names, and ``safe_interactive -mf`` holding
ParlAI's conversation (recorded from ParlAI 1.7.2: tests/fixtures/blenderbot1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agents.blender1 import Blender1Chat, persona_text
from agents.safety import UNSAFE_INPUT_MESSAGE, UNSAFE_REPLY_MESSAGE, SafetyChecker
from opt_serving import LLM
from opt_serving.checkpoint.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "blenderbot1"
ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((FIXTURES / "parlai_1.7.2.json").read_text())
HISTORY = {k: RECORDED["opt"][k] for k in ("delimiter", "history_add_global_end_token",
                                           "text_truncate")}
RECIPE = dict(inference="beam", beam_size=10, beam_min_length=20, beam_block_ngram=3,
              beam_context_block_ngram=3, beam_length_penalty=0.65, max_tokens=32)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(FIXTURES / "tiny" / "model"), opt=HISTORY)


def test_llm_of_a_parlai_file_replies_as_parlai(llm):
    turns = [t for c in RECORDED["conversations"] for t in c["turns"]][:3]
    replies = llm.generate([t["message"] for t in turns[:1]] + [t["history_vec"]
                                                                 for t in turns[1:]], **RECIPE)
    for turn, reply in zip(turns, replies):
        assert reply.text == turn["reply"]
        assert list(reply.token_ids) == turn["best"][1:-1]
        assert [list(c.token_ids) for c in reply.nbest] == \
            [h["tokens"][1:-1] for h in turn["nbest"]]
        assert [c.rescored for c in reply.nbest] == \
            pytest.approx([h["score"] for h in turn["nbest"]], abs=1e-5)


def test_llm_defaults_come_from_the_model_opt_and_options_are_checked(llm):
    assert (llm.defaults.inference, llm.defaults.max_tokens) == ("greedy", 32)  # its .opt
    with pytest.raises(TypeError, match="did you mean 'beam_size'"):
        llm.generate("hi", beam_sise=3)
    with pytest.raises(ValueError, match="beam_size 11 is more than"):
        llm.generate("hi", inference="beam", beam_size=11)
    with pytest.raises(ValueError, match="inference must be beam or greedy"):
        llm.generate("hi", inference="sample")
    with pytest.raises(ValueError, match="beam_length_penalty must be a number"):
        llm.generate("hi", beam_length_penalty="x")


def test_a_zoo_path_resolves_under_the_datapath_and_names_missing_files(tmp_path, monkeypatch):
    where = tmp_path / "models" / "blender" / "blender_tiny"
    shutil.copytree(FIXTURES / "tiny", where)
    monkeypatch.setenv("PARLAI_DATAPATH", str(tmp_path))
    llm = LLM("zoo:blender/blender_tiny/model", opt=HISTORY)
    turn = RECORDED["conversations"][0]["turns"][0]
    assert llm.generate(turn["message"], **RECIPE)[0].text == turn["reply"]
    with pytest.raises(CheckpointError) as err:
        LLM("zoo:blender/blender_3B/model")
    assert "blender_3B/model.opt" in str(err.value) and str(tmp_path) in str(err.value)
    monkeypatch.delenv("PARLAI_DATAPATH")
    with pytest.raises(CheckpointError, match="--datapath"):
        LLM("zoo:blender/blender_3B/model")


def test_an_hf_folder_gives_the_same_replies_from_token_ids(llm, tmp_path):
    pytest.importorskip("transformers")
    from opt_serving.blenderbot.hf import to_hf

    hf = to_hf(llm.model)
    hf.save_pretrained(tmp_path)
    folder = LLM(str(tmp_path))
    turn = RECORDED["conversations"][0]["turns"][0]
    (reply,) = folder.generate(turn["history_vec"], **RECIPE)
    assert list(reply.token_ids) == turn["best"][1:-1]
    with pytest.raises(ValueError, match="no tokenizer files"):
        folder.generate("hello")


# -- the chat -----------------------------------------------------------------------------------

def test_the_persona_opens_the_first_message_as_parlais_world_sends_it():
    seen = []

    def generate(turns):
        seen.append(list(turns))
        return f"reply {len(seen)}"

    chat = Blender1Chat(generate, persona=["i like hiking.", "your persona: i have a dog."])
    chat.respond("hi")
    chat.respond("and you?")
    assert seen == [["your persona: i like hiking.\nyour persona: i have a dog.\nhi"],
                    ["your persona: i like hiking.\nyour persona: i have a dog.\nhi",
                     "reply 1", "and you?"]]
    assert persona_text([" ", "x"]) == "your persona: x"


def test_an_unsafe_message_is_refused_and_an_unsafe_reply_clears_the_history():
    replies = iter(["i like dogs.", "you are a fucking idiot", "hello again"])
    seen = []

    def generate(turns):
        seen.append(list(turns))
        return next(replies)

    chat = Blender1Chat(generate, persona=["i like hiking."],
                        safety=SafetyChecker("string_matcher"))
    assert chat.respond("hi").text == "i like dogs."
    refused = chat.respond("shut up you fucking idiot")
    assert (refused.text, refused.status) == (UNSAFE_INPUT_MESSAGE, "unsafe_input")
    assert len(seen) == 1  # the model never saw it
    unsafe = chat.respond("what do you think of me?")
    assert (unsafe.text, unsafe.status) == (UNSAFE_REPLY_MESSAGE, "unsafe_reply")
    assert chat.respond("ok").text == "hello again"
    assert seen[-1] == ["ok"]  # ParlAI's reset: history and persona gone until [DONE]
    chat.reset()
    assert chat.turns == []


def _safe_interactive(*args, script: str, env=None):
    return subprocess.run([sys.executable, "-m", "agents.cli", *args, "--script", script],
                          capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, **(env or {})})


def test_safe_interactive_mf_chats_as_parlai_with_a_persona_and_done(tmp_path):
    """The real command, in its own process: ParlAI's recorded conversation with a persona,
    twice, [DONE] between (a new chat opens with the persona again and replies the same),
    replies printed as ParlAI's interactive prints them."""
    conv = RECORDED["conversations"][0]
    assert conv["persona"] == "your persona: i like hiking.\nyour persona: i have a dog."
    script, want = [], []
    for _ in range(2):
        for t, turn in enumerate(conv["turns"]):
            script.append(turn["message"].split("\n")[-1] if t == 0 else turn["message"])
            want.append("[TransformerGenerator]: " + turn["reply"])
        script.append("[DONE]")
    (tmp_path / "script.txt").write_text("\n".join(script + ["[EXIT]", "never sent"]) + "\n")
    (tmp_path / "persona.txt").write_text("i like hiking.\n\ni have a dog.\n")
    done = _safe_interactive(
        "-mf", str(FIXTURES / "tiny" / "model"), "--persona-file",
        str(tmp_path / "persona.txt"), "--safety", "none", "--inference", "beam",
        "--beam-size", "10", "--beam-min-length", "20", "--beam-block-ngram", "3",
        "--beam-context-block-ngram", "3", "--label-truncate", "32", "--delimiter", "  ",
        "--history-add-global-end-token", "end", script=str(tmp_path / "script.txt"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [x for x in lines if x.startswith("[TransformerGenerator]")] == want
    assert lines.count("CHAT DONE") == 2
    assert "never sent" not in done.stdout


def test_mf_and_opt_server_are_exclusive_and_a_missing_model_is_named(tmp_path):
    (tmp_path / "s.txt").write_text("hi\n")
    both = _safe_interactive("-mf", "x", "--opt-server", "localhost:1",
                             script=str(tmp_path / "s.txt"))
    assert both.returncode == 2 and "-mf (BlenderBot 1) and --opt-server" in both.stderr
    missing = _safe_interactive("-mf", "zoo:blender/blender_90M/model", "--datapath",
                                str(tmp_path), script=str(tmp_path / "s.txt"))
    assert missing.returncode == 2 and "blender_90M/model.opt" in missing.stderr


def test_safe_interactive_mf_with_every_reply_unsafe_clears_and_says_so(tmp_path):
    """A forced unsafe reply: the classifier at threshold 0 finds every reply unsafe, so each
    turn prints ParlAI's unsafe-reply text and the history starts again."""
    (tmp_path / "s.txt").write_text("hi there\nhow are you?\n")
    done = _safe_interactive("-mf", str(FIXTURES / "tiny" / "model"), "--persona", "i like "
                             "hiking.", "--safety", "classifier",
                             "--reply-classifier-threshold", "0", script=str(tmp_path / "s.txt"))
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stdout.splitlines() if not x.startswith("Enter Your Message")]
    assert lines == [UNSAFE_REPLY_MESSAGE, UNSAFE_REPLY_MESSAGE]
