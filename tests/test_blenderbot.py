"""BlenderBot 1 groundwork (issue 20): the encoder-decoder against HF transformers' Blenderbot
on the same random weights, and ParlAI's TreeSearch rules on hand-built logits."""

from __future__ import annotations

import pytest
import torch

from opt_serving.blenderbot.config import END_ID, NEAR_INF, START_ID
from opt_serving.blenderbot.hf import config_from_hf, load_folder, state_from_hf
from opt_serving.blenderbot.model import BlenderbotModel, full_recompute
from opt_serving.blenderbot.search import BeamState, SearchOptions, block, search

transformers = pytest.importorskip("transformers")

V = 96


def _hf(small: bool, seed: int = 0):
    """A tiny random HF Blenderbot (prelayernorm) or BlenderbotSmall (xlm), norms perturbed
    so that they are exercised."""
    kind = "BlenderbotSmall" if small else "Blenderbot"
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
        # HF 5.x's BlenderbotSmall decoder leaves the embedding scale out (ParlAI's 90M has
        # it): the two networks agree only without it.
        scale_embedding=not small)
    torch.manual_seed(seed)
    hf = getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = config_from_hf(config.to_dict())
    ours = BlenderbotModel(cfg)
    ours.load_state_dict(state_from_hf(hf.state_dict(), cfg))
    return hf, ours.eval()


@pytest.mark.parametrize("small", [False, True], ids=["prelayernorm", "xlm"])
def test_encoder_and_teacher_forced_logits_equal_hf(small):
    hf, ours = _hf(small)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(4, V, (2, 11), generator=gen)
    y = torch.cat([torch.full((2, 1), START_ID), torch.randint(4, V, (2, 7), generator=gen)], 1)
    with torch.no_grad():
        memory = ours.encode(x)
        torch.testing.assert_close(memory, hf.model.encoder(input_ids=x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        theirs = hf(input_ids=x, decoder_input_ids=y).logits
        mine = ours.decode(y, memory, x != 0)
    keep = [i for i in range(V) if i != START_ID]  # ParlAI blocks __start__; HF does not
    torch.testing.assert_close(mine[..., keep], theirs[..., keep], atol=1e-5, rtol=1e-5)
    assert bool((mine[..., START_ID] == -NEAR_INF).all())


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_an_hf_folder_loads_to_the_same_network(tmp_path, safetensors):
    hf, ours = _hf(small=False, seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=safetensors)
    loaded = load_folder(tmp_path)
    x = torch.randint(4, V, (1, 9), generator=torch.Generator().manual_seed(4))
    y = torch.tensor([[START_ID, 7, 8, 9]])
    with torch.no_grad():
        want = ours.decode(y, ours.encode(x), x != 0)
        got = loaded.decode(y, loaded.encode(x), x != 0)
    assert torch.equal(got, want)


def test_an_hf_folder_with_an_output_bias_or_another_model_is_refused(tmp_path):
    from opt_serving.checkpoint.errors import CheckpointError

    hf, _ = _hf(small=False, seed=2)
    with torch.no_grad():
        hf.final_logits_bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "bias")
    with pytest.raises(ValueError, match="final_logits_bias"):
        load_folder(tmp_path / "bias")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text('{"architectures": ["OPTForCausalLM"]}')
    with pytest.raises(CheckpointError, match="not a Blenderbot config"):
        load_folder(tmp_path / "opt")


def test_greedy_equals_hf_greedy_with_parlais_settings():
    hf, ours = _hf(small=False, seed=3)
    context = torch.randint(4, V, (1, 12), generator=torch.Generator().manual_seed(5))
    options = SearchOptions(inference="greedy", max_tokens=24)
    (best,) = search(full_recompute(ours, context[0].tolist()), context[0].tolist(), options)
    with torch.no_grad():
        theirs = hf.generate(context, num_beams=1, do_sample=False, min_length=0,
                             max_new_tokens=24, no_repeat_ngram_size=3,
                             encoder_no_repeat_ngram_size=3, suppress_tokens=[START_ID],
                             forced_eos_token_id=None)[0].tolist()
    reply = theirs[1:]
    reply = reply[:reply.index(END_ID)] if END_ID in reply else reply[:-1]
    assert list(best.tokens) == reply


# -- the search's rules on hand-built logits ------------------------------------------------------

def scripted(prefer, v: int = 16):
    """A step whose logits put ``prefer(prefix)`` (a token -> logit dict) over a flat -5."""
    def step(prefixes):
        logits = torch.full((len(prefixes), v), -5.0)
        for i, p in enumerate(prefixes):
            for token, value in prefer(p).items():
                logits[i, token] = value
        return logits
    return step


def test_the_end_is_allowed_exactly_at_token_min_length_plus_one():
    always_end = scripted(lambda p: {END_ID: 10.0, 4 + len(p) % 9: 5.0})
    options = SearchOptions(beam_size=2, beam_min_length=20, beam_block_ngram=0,
                            beam_context_block_ngram=0, max_tokens=40)
    best = search(always_end, (), options)[0]
    assert len(best.tokens) == 20  # the end was token 21
    greedy = search(always_end, (), SearchOptions(inference="greedy", beam_min_length=20,
                                                   beam_block_ngram=0, max_tokens=40))
    assert greedy[0].tokens == ()  # greedy ignores the minimum length


def test_a_forced_end_at_the_limit_replaces_beam_zeros_last_token():
    never_end = scripted(lambda p: {5 + len(p) % 7: 3.0})
    options = SearchOptions(beam_size=3, beam_min_length=0, beam_block_ngram=0,
                            beam_context_block_ngram=0, max_tokens=6)
    (only,) = search(never_end, (), options)
    assert len(only.tokens) == 5  # max_tokens counts the end
    assert only.rescored == pytest.approx(only.score / ((6 + 2) / 6) ** 0.65)


def test_an_ended_hypothesis_keeps_its_place_for_one_step_and_is_not_extended():
    # Step 0: 6 is best, the end second; step 1 on: 7 after 6.
    state = BeamState(SearchOptions(beam_size=2, beam_min_length=0, beam_block_ngram=0,
                                    beam_context_block_ngram=0, max_tokens=10), ())
    first = torch.full((1, 16), -5.0)
    first[0, 6], first[0, END_ID] = 3.0, 2.0
    state.advance(first)
    assert [h[-1] for h in state.hyps] == [6, END_ID]  # the ended one holds a beam slot
    assert len(state.finished) == 1 and not state.eos_top and not state.done
    nxt = torch.full((2, 16), -5.0)
    nxt[:, 7] = 1.0
    state.advance(nxt)
    # The ended beam's children are -1e20 away: both slots continue beam 0.
    assert [h[:2] for h in state.hyps] == [[START_ID, 6], [START_ID, 6]]


def test_the_search_stops_when_an_end_tops_and_k_have_finished():
    state = BeamState(SearchOptions(beam_size=2, beam_min_length=0, beam_block_ngram=0,
                                    beam_context_block_ngram=0, max_tokens=50), ())
    step0 = torch.full((1, 16), -5.0)
    step0[0, END_ID], step0[0, 9] = 2.0, 1.0
    state.advance(step0)  # the end tops, but one finished of two
    assert state.eos_top and not state.done
    step1 = torch.full((2, 16), -5.0)
    step1[:, END_ID] = 4.0
    state.advance(step1)
    assert len(state.finished) == 2 and state.done


def test_rescoring_prefers_the_length_penalised_best():
    state = BeamState(SearchOptions(beam_size=2, beam_length_penalty=0.65), ())
    state.finished = [([START_ID, 5, END_ID], -2.0), ([START_ID, 5, 6, 7, 8, END_ID], -2.6)]
    short, long_ = -2.0 / ((2 + 2) / 6) ** 0.65, -2.6 / ((5 + 2) / 6) ** 0.65
    ranked = state.results()
    assert [h.tokens for h in ranked] == ([(5, 6, 7, 8), (5,)] if long_ > short
                                          else [(5,), (5, 6, 7, 8)])
    assert sorted(h.rescored for h in ranked) == pytest.approx(sorted([short, long_]))


def test_ngram_blocking_counts_the_start_token_and_the_truncated_context():
    lp = torch.zeros(1, 16)
    block(lp, [[START_ID, 7, 8, START_ID, 7]], 3, None)  # (__start__, 7, 8) was seen
    assert lp[0, 8] == -NEAR_INF and (lp[0, :8] == 0).all()
    lp = torch.zeros(1, 16)
    block(lp, [[START_ID, 10, 11]], 3, (12, 10, 11, 13))  # the context's (10, 11, 13)
    assert lp[0, 13] == -NEAR_INF and int((lp[0] != 0).sum()) == 1
    lp = torch.zeros(1, 16)
    block(lp, [[START_ID, 10, 11]], 3, (12, 10))  # cut from the context: not blocked
    assert int((lp[0] != 0).sum()) == 0
