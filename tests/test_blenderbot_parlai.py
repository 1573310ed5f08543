"""BlenderBot 1 against ParlAI 1.7.2 itself: a tiny model ParlAI trained and saved, loaded
from ParlAI's own files, must build ParlAI's history vectors and find ParlAI's beam-search
n-best lists (tests/fixtures/blenderbot1, recorded with ParlAI; CI needs no ParlAI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from opt_serving.blenderbot import parlai
from opt_serving.blenderbot.model import full_recompute
from opt_serving.blenderbot.search import search
from opt_serving.checkpoint.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "blenderbot1"
# The byte-level prelayernorm model (as the 400M .. 9.4B) and the subword-BPE xlm one (as 90M).
MODELS = {"byte-level": ("tiny", "parlai_1.7.2.json"),
          "subword-xlm": ("tiny-xlm", "parlai_1.7.2_xlm.json")}
RECORDED = json.loads((FIXTURES / "parlai_1.7.2.json").read_text())
_LOADED: dict = {}


def loaded(kind: str):
    if kind not in _LOADED:
        folder, recording = MODELS[kind]
        _LOADED[kind] = (parlai.load(FIXTURES / folder / "model"),
                         json.loads((FIXTURES / recording).read_text()))
    return _LOADED[kind]


@pytest.fixture(scope="module")
def files():
    return loaded("byte-level")[0]


def turns():
    """(model kind, conversation, turn index, history so far, the recorded turn)."""
    for kind, (_, recording) in MODELS.items():
        recorded = json.loads((FIXTURES / recording).read_text())
        for c, conv in enumerate(recorded["conversations"]):
            history = []
            for t, turn in enumerate(conv["turns"]):
                history.append(turn["message"])
                yield kind, c, t, list(history), turn
                history.append(turn["reply"])  # ParlAI adds the bot's reply as its turn


CASES = list(turns())
IDS = [f"{kind}-c{c}t{t}" for kind, c, t, *_ in CASES]


@pytest.mark.parametrize("kind, c, t, history, turn", CASES, ids=IDS)
def test_history_vectors_are_parlais(kind, c, t, history, turn):
    files, recorded = loaded(kind)
    opt = recorded["opt"]
    assert parlai.history_vector(files.tokenizer, history, delimiter=opt["delimiter"],
                                 truncate=opt["text_truncate"]) == turn["history_vec"]


@pytest.mark.parametrize("kind, c, t, history, turn", CASES, ids=IDS)
def test_beam_search_finds_parlais_n_best(kind, c, t, history, turn):
    files, recorded = loaded(kind)
    options = parlai.search_options({**files.opt, **recorded["opt"]})
    assert (options.beam_size, options.beam_min_length, options.max_tokens) == (10, 20, 32)
    ours = search(full_recompute(files.model, turn["history_vec"]), turn["history_vec"],
                  options)
    theirs = turn["nbest"]
    assert [list(h.tokens) for h in ours] == [h["tokens"][1:-1] for h in theirs]
    assert [h.rescored for h in ours] == pytest.approx([h["score"] for h in theirs], abs=1e-5)
    assert list(ours[0].tokens) == turn["best"][1:-1]


def test_paths_inside_the_opt_are_the_trainers_and_the_files_beside_are_used(files):
    recorded = Path(files.opt["dict_file"])  # the trainer's path, not this checkout's
    assert recorded.parent != FIXTURES / "tiny" and recorded.name == "model.dict"
    assert len(files.tokenizer) == files.model.cfg.vocab_size == 304


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.opt").write_text('{"variant": "prelayernorm", "embedding_size": '
                                            '1073741824, "ffn_size": 64}'),
     "embedding_size must be an integer between 1 and 32768"),
    (lambda d: (d / "model.opt").write_text('{"variant": "prelayernorm", "embedding_size": 64, '
                                            '"ffn_size": 64}'), "embedding_size 64"),
    (lambda d: (d / "model.opt").write_text("not json"), "not JSON"),
    (lambda d: (d / "model.opt").unlink(), "model.opt is missing"),
    (lambda d: (d / "model.dict").write_text("__null__\t1\n"), "dictionary"),
    (lambda d: (d / "model.dict-merges.txt").unlink(), "merges"),
    (lambda d: (d / "model").write_bytes((FIXTURES / "tiny" / "model").read_bytes()[:5000]),
     "truncated"),
])
def test_hostile_or_mismatched_files_are_refused_clearly(tmp_path, damage, words):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny", folder)
    damage(folder)
    with pytest.raises((CheckpointError, ValueError)) as err:
        parlai.load(folder / "model")
    assert words in str(err.value)


def test_the_same_weights_as_an_hf_folder_give_identical_logits(files, tmp_path):
    """ParlAI's files and an HF folder of the same weights (written here through HF's own
    save_pretrained) load to the same network."""
    pytest.importorskip("transformers")
    from opt_serving.blenderbot.hf import load_folder, to_hf

    hf = to_hf(files.model)  # HF's own model class, holding the same weights
    hf.save_pretrained(tmp_path)
    loaded = load_folder(tmp_path)
    turn = RECORDED["conversations"][0]["turns"][0]
    x = torch.tensor([turn["history_vec"]])
    y = torch.tensor([turn["best"][:-1]])
    with torch.no_grad():
        want = files.model.decode(y, files.model.encode(x), x != 0)
        got = loaded.decode(y, loaded.encode(x), x != 0)
    assert torch.equal(got, want)


def test_a_legacy_format_model_file_loads_the_same(files, tmp_path):
    """Zoo files of 2020 predate torch's zip format: the same weights saved the old way."""
    folder = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "tiny", folder)
    torch.save({"model": files.model.state_dict(), "number_training_updates": 400},
               folder / "model", _use_new_zipfile_serialization=False)
    legacy = parlai.load(folder / "model")
    for name, tensor in files.model.state_dict().items():
        assert torch.equal(legacy.model.state_dict()[name], tensor), name
