"""BlenderBot 1 in the batching engine (issue 20): cached decoding equals the full-recompute
network, and beam groups batched together (joining and leaving mid-flight) find exactly the
n-best lists ParlAI 1.7.2 found (tests/fixtures/blenderbot1), alone and among others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opt_serving.blenderbot import parlai
from opt_serving.blenderbot.batch import BeamBatch, SharedBeamBatch
from opt_serving.blenderbot.config import PRESETS, START_ID
from opt_serving.blenderbot.engine import BeamEngine
from opt_serving.blenderbot.model import BlenderbotModel, full_recompute, init_random
from opt_serving.blenderbot.search import SearchOptions, search
from opt_serving.protocol import RequestError

FIXTURES = Path(__file__).parent / "fixtures" / "blenderbot1"
MODELS = {"byte-level": ("tiny", "parlai_1.7.2.json"),
          "subword-xlm": ("tiny-xlm", "parlai_1.7.2_xlm.json")}
_LOADED: dict = {}


def loaded(kind: str):
    if kind not in _LOADED:
        folder, recording = MODELS[kind]
        files = parlai.load(FIXTURES / folder / "model")
        recorded = json.loads((FIXTURES / recording).read_text())
        turns = [t for c in recorded["conversations"] for t in c["turns"]]
        _LOADED[kind] = (files, parlai.search_options({**files.opt, **recorded["opt"]}), turns)
    return _LOADED[kind]


def nbest(results):
    return [(list(h.tokens), h.rescored) for h in results]


def parlais(turn):
    return [(h["tokens"][1:-1], h["score"]) for h in turn["nbest"]]


FORKING = ["copy", "share"]  # beams fork by copying histories / by sharing keys via tables


@pytest.mark.parametrize("forking", FORKING)
@pytest.mark.parametrize("kind", MODELS)
def test_batched_groups_find_parlais_n_best_lists(kind, forking):
    """Five requests through three group slots: groups join as others finish, so every
    request shares its steps with different neighbours at different lengths."""
    files, options, turns = loaded(kind)
    engine = BeamEngine(files.model, max_groups=3, max_beams=10, max_tokens=options.max_tokens,
                        forking=forking)
    got = engine.run([t["history_vec"] for t in turns], options)
    for turn, results in zip(turns, got):
        ours, theirs = nbest(results), parlais(turn)
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-5)
    # Batched: fewer steps than the requests one after the other.
    # Alone (one group slot, one request at a time): the same replies. Scores agree to
    # float rounding (a batch of another shape sums its matmuls in another order).
    alone = BeamEngine(files.model, max_groups=1, max_tokens=options.max_tokens)
    by_itself = alone.run([t["history_vec"] for t in turns], options)
    for a, b in zip(by_itself, got):
        assert [t for t, _ in nbest(a)] == [t for t, _ in nbest(b)]
        assert [s for _, s in nbest(a)] == pytest.approx([s for _, s in nbest(b)], abs=1e-5)
    assert engine.steps < alone.steps


def _random_model(variant: str) -> BlenderbotModel:
    name = "blender-tiny" if variant == "prelayernorm" else "blender-tiny-xlm"
    return init_random(BlenderbotModel(PRESETS[name]), seed=4, std=0.2).eval()


@pytest.mark.parametrize("layout", [BeamBatch, SharedBeamBatch])
@pytest.mark.parametrize("variant", ["prelayernorm", "xlm"])
def test_cached_steps_equal_the_full_forward_at_ragged_lengths(variant, layout):
    """Two groups of 3 rows at different lengths and contexts: every step's logits equal the
    full-recompute decoder's on the same prefixes."""
    model = _random_model(variant)
    gen = torch.Generator().manual_seed(1)
    contexts = [torch.randint(4, 96, (n,), generator=gen).tolist() for n in (9, 5)]
    batch = layout(model, groups=2, beams=3, steps=8, context=12)
    batch.encode([0, 1], contexts)
    prefixes = [[[START_ID] for _ in range(3)] for _ in contexts]
    starts = [0, 2]  # group 1 starts two steps later: positions differ within a step
    for step in range(6):
        live = [g for g in range(2) if step >= starts[g]]
        tokens = torch.tensor([[p[-1] for p in prefixes[g]] for g in range(2)])
        positions = torch.tensor([len(prefixes[g][0]) - 1 for g in range(2)])
        logits = batch.step(tokens, positions)
        for g in live:
            ctx = torch.tensor([contexts[g]])
            with torch.no_grad():
                want = model.decode(torch.tensor(prefixes[g]), model.encode(ctx).expand(3, -1, -1),
                                    (ctx != 0).expand(3, -1))[:, -1]
            torch.testing.assert_close(logits[g], want, atol=1e-5, rtol=1e-5)
        # Rows take other rows' histories, as beams do (row 0 and row 2 both continue
        # row 2), then each row grows by a token of its own.
        sources = [2, 1, 2]
        batch.reorder(torch.tensor([sources, sources]), span=int(positions.max()) + 1)
        for g in range(2):
            prefixes[g] = [list(prefixes[g][s]) for s in sources]
            if g in live:
                for j, p in enumerate(prefixes[g]):
                    p.append(int(torch.randint(4, 90, (), generator=gen)) + j)


def test_cross_attention_is_stored_once_per_group_not_per_beam():
    batch = BeamBatch(_random_model("prelayernorm"), groups=4, beams=10, steps=16, context=20)
    layers, heads = 2, 4
    assert batch.cross_keys.shape == (layers, 4, heads, 20, 8)  # no beam dimension
    assert batch.keys.shape == (layers, 4, 10, 16, heads, 8)


def test_greedy_in_the_engine_equals_the_reference_search():
    model = _random_model("prelayernorm")
    gen = torch.Generator().manual_seed(9)
    contexts = [torch.randint(4, 96, (n,), generator=gen).tolist() + [2] for n in (6, 11, 3)]
    options = SearchOptions(inference="greedy", max_tokens=12)
    engine = BeamEngine(model, max_groups=2, max_tokens=16)
    got = engine.run(contexts, options)
    for context, results in zip(contexts, got):
        want = search(full_recompute(model, context), context, options)
        assert [list(h.tokens) for h in results] == [list(h.tokens) for h in want]
        assert [h.rescored for h in results] == pytest.approx([h.rescored for h in want])


@pytest.mark.parametrize("context, options, field, words", [
    ([], SearchOptions(), "prompt", "empty"),
    (list(range(4, 70)), SearchOptions(), "prompt", "at most 64"),
    ([5, 500], SearchOptions(), "prompt", "outside the vocabulary"),
    ([5, 6], SearchOptions(beam_size=11), "beam_size", "more than this server's 10"),
    ([5, 6], SearchOptions(max_tokens=40), "max_tokens", "more than this model's 32"),
])
def test_requests_that_do_not_fit_are_refused_by_name(context, options, field, words):
    engine = BeamEngine(_random_model("prelayernorm"), max_groups=1, max_tokens=32)
    with pytest.raises(RequestError) as err:
        engine.submit(context, options)
    assert err.value.param == field and words in str(err.value)
    assert engine.idle


@pytest.mark.parametrize("forking", FORKING)
def test_a_cancelled_group_frees_its_slot_and_the_others_finish_unchanged(forking):
    files, options, turns = loaded("byte-level")
    engine = BeamEngine(files.model, max_groups=2, max_tokens=options.max_tokens,
                        forking=forking)
    a, b, c = (engine.submit(t["history_vec"], options) for t in turns[:3])
    engine.step()
    engine.step()
    engine.cancel(a)  # leaves slot 0: b moves into it
    while not engine.idle:
        engine.step()
    assert a.results is None
    assert nbest(b.results)[0][0] == parlais(turns[1])[0][0]
    assert nbest(c.results)[0][0] == parlais(turns[2])[0][0]


def test_the_engine_runs_in_bf16_as_the_reference_does():
    model = _random_model("prelayernorm").to(torch.bfloat16)
    context = [5, 17, 40, 33, 2]
    options = SearchOptions(inference="beam", beam_size=4, beam_min_length=3, max_tokens=10)
    (got,) = BeamEngine(model, max_groups=2, max_beams=4, max_tokens=16).run([context], options)
    want = search(full_recompute(model, context), context, options)
    assert [list(h.tokens) for h in got][:1] == [list(h.tokens) for h in want][:1]
    assert all(len(h.tokens) <= 10 for h in got)
