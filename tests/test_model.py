"""The decoder against HF transformers' OPT (an implementation nobody here wrote)."""

import dataclasses

import pytest
import torch

from constants import DEFAULTS
from opt_serving.config import DICT_SIZE, PRESETS, get_preset
from opt_serving.runtime.generate import generate
from opt_serving.model import AttentionRows, KVCache, OPTModel, init_random
from opt_serving.protocol import SamplingParams
from opt_serving.testing.hf_twin import hf_twin

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    model = init_random(OPTModel(get_preset("tiny")), seed=7).eval()
    return model, hf_twin(model)


def test_logits_match_hf_transformers(pair):
    model, hf = pair
    tokens = torch.tensor([[2, 133, 812, 4, 50118, 1000, 7], [2, 9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        ours = model(tokens)[..., :DICT_SIZE]
        theirs = hf(tokens).logits[..., :DICT_SIZE]
    assert ours.shape == (2, 7, DICT_SIZE)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_greedy_continuation_matches_hf_generate(pair):
    """The engine's own step (chunked prefill, KV cache, sampler) against HF's generate."""
    model, hf = pair
    prompt = [133, 812, 16, 10]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([[2, *prompt]]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12, pad_token_id=1)[0, 5:].tolist()
    for chunk in (512, 2):  # the prompt in one step, and in chunks of 2 tokens
        (ours,) = generate(model, [prompt], SamplingParams(max_tokens=12, min_tokens=12,
                                                           temperature=0),
                           limits=dataclasses.replace(DEFAULTS, max_batch_tokens=chunk))
        assert list(ours.generated) == theirs


def packed_step(model, cache, rows):
    """One packed step; rows: (start, tokens, block table). Logits at every packed token."""
    starts = [start for start, _, _ in rows]
    lengths = [len(tokens) for _, tokens, _ in rows]
    attn = AttentionRows.build(starts, lengths, [list(t) for _, _, t in rows],
                               cache.block_size, "cpu")
    tokens = torch.tensor([t for _, ts, _ in rows for t in ts])
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    return model.step(tokens, positions, cache, attn, torch.arange(len(tokens)))


def test_packed_paged_steps_equal_separate_forwards(pair):
    """Two sequences packed in one forward, their keys in 4-position blocks: a in consecutive
    blocks (read in place), b in scattered ones (gathered); a chunked prefill, then a step
    where a takes two tokens and b decodes one."""
    model, _ = pair
    a, b = [2, 5, 6, 7, 8, 9], [2, 40, 41, 42, 43]
    table_a, table_b = [1, 2], [5, 0]
    with torch.no_grad():
        full_a, full_b = model(torch.tensor([a]))[0], model(torch.tensor([b + [7]]))[0]
        cache = KVCache(model.cfg, num_blocks=6, block_size=4)
        out = packed_step(model, cache, [(0, a[:4], table_a), (0, b, table_b)])
        close = dict(atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:4, :DICT_SIZE], full_a[:4, :DICT_SIZE], **close)
        torch.testing.assert_close(out[4:, :DICT_SIZE], full_b[:5, :DICT_SIZE], **close)
        out = packed_step(model, cache, [(4, a[4:], table_a), (5, [7], table_b)])
        torch.testing.assert_close(out[:2, :DICT_SIZE], full_a[4:, :DICT_SIZE], **close)
        torch.testing.assert_close(out[2, :DICT_SIZE], full_b[5, :DICT_SIZE], **close)


def test_attention_reads_consecutive_blocks_in_place():
    rows = AttentionRows.build([3, 0], [1, 5], [[2, 3], [4, 1]], block_size=4, device="cpu")
    assert rows.keys[0] == slice(8, 12)  # blocks 2, 3: cache rows 8.. in place
    assert rows.keys[1].tolist() == [16, 17, 18, 19, 4]  # blocks 4 then 1: gathered
    assert rows.write.tolist() == [11, 16, 17, 18, 19, 4]
    assert rows.masks[0] is None and rows.masks[1] == "causal"


def test_padding_symbols_are_never_produced(pair):
    model, _ = pair
    with torch.no_grad():
        logits = model(torch.tensor([[2, 3, 4]]))
    assert torch.isneginf(logits[..., DICT_SIZE:]).all()
    assert int(logits[0, -1].argmax()) < DICT_SIZE


def test_runs_in_bfloat16_on_cpu():
    model = init_random(OPTModel(get_preset("tiny")), seed=1).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.tensor([[2, 100, 200]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out[..., :DICT_SIZE]).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_equals_built_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = OPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count()
    assert set(model.state_dict()) == set(cfg.param_shapes())


def test_invalid_degree_message_lists_valid_values():
    with pytest.raises(ValueError) as e:
        get_preset("bb3-30b").check_mp(16)
    assert "bb3-30b has 56 heads" in str(e.value)
    assert "valid --mp values are 1, 2, 4, 8" in str(e.value)
