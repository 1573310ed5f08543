"""The decoder against HF transformers' OPT (an implementation nobody here wrote)."""

import pytest
import torch

from opt_serving.config import DICT_SIZE, PRESETS, get_preset
from opt_serving.decoding.generate import generate
from opt_serving.model import KVCache, OPTModel, init_random
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
                                                           temperature=0), step_tokens=chunk)
        assert list(ours.generated) == theirs


def test_cached_ragged_batch_equals_separate_forwards(pair):
    model, _ = pair
    a = torch.tensor([2, 5, 6, 7, 8, 9])
    b = torch.tensor([2, 40, 41])
    with torch.no_grad():
        full_a, full_b = model(a[None])[0], model(b[None])[0]
        cache = KVCache(model.cfg, 4, 16)
        # Prefill both prompts in one right-padded batch, in cache slots 3 and 1.
        batch = torch.stack([a[:4], torch.cat([b, torch.tensor([1])])])
        slots, start = torch.tensor([3, 1]), torch.tensor([0, 0])
        out = model(batch, start=start, cache=cache, slots=slots)
        torch.testing.assert_close(out[0, :4, :DICT_SIZE], full_a[:4, :DICT_SIZE], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, :3, :DICT_SIZE], full_b[:, :DICT_SIZE], atol=1e-5, rtol=0)
        # Next step: a continues with two tokens, b decodes one (padding overwritten later).
        step = torch.tensor([[a[4], a[5]], [7, 1]])
        out = model(step, start=torch.tensor([4, 3]), cache=cache, slots=slots)
        torch.testing.assert_close(out[0, :, :DICT_SIZE], full_a[4:, :DICT_SIZE], atol=1e-5, rtol=0)
        ref_b = model(torch.cat([b, torch.tensor([7])])[None])[0, -1, :DICT_SIZE]
        torch.testing.assert_close(out[1, 0, :DICT_SIZE], ref_b, atol=1e-5, rtol=0)


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
