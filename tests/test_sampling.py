"""Sampling functions on small hand-made logits: each rule against its formula in the contract."""

import math

import pytest
import torch

from opt_serving.config import DICT_SIZE, EOS_ID, VOCAB_SIZE
from opt_serving.protocol import RequestError, parse_request
from opt_serving.decoding.sampling import (
    RowParams, SamplingParams, apply_penalties, draw_uniforms, gather_logprobs, log_probs,
    make_generator, next_tokens, nucleus_top_p, pick_best, process_logits, sample,
    sentence_steps, source_tokens, token_counts, top_logprobs)

V = 16


def rows(*params: SamplingParams) -> RowParams:
    return RowParams.stack(params)


def process(logits, rp, n_generated=0, stop_ids=None, gen=None, src=None):
    b = logits.shape[0]
    return process_logits(logits, rp, generated_counts=gen, source_counts=src,
                          n_generated=torch.full((b,), n_generated),
                          stop_ids=stop_ids or [()] * b, dict_size=logits.shape[-1])


def test_greedy_when_temperature_zero_or_top_p_not_positive():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    rp = rows(SamplingParams(temperature=0.0), SamplingParams(top_p=-1.0),
              SamplingParams(top_p=0.0, temperature=0.7))
    assert rp.greedy.tolist() == [True, True, True]
    gen = make_generator(1)
    state = gen.get_state()
    u = draw_uniforms([gen] * 3, rp.greedy.tolist())
    assert torch.equal(gen.get_state(), state)  # greedy rows consume no randomness
    tokens = sample(process(logits, rp), rp.top_p, rp.top_k, rp.greedy, u)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_temperature_is_not_rounded():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    rp = rows(SamplingParams(temperature=0.95), SamplingParams(temperature=0.9))
    out = process(logits, rp)
    assert torch.allclose(out[0], logits[0] / 0.95) and torch.allclose(out[1], logits[1] / 0.9)
    assert not torch.allclose(out[0], logits[0] / 0.9)  # metaseq rounded 0.95 to 0.9


def test_penalty_formula_over_generated_and_source_tokens():
    logits = torch.zeros(1, V)
    gen = token_counts([[3, 3, 5]], V)
    src = token_counts([[5, 7]], V)
    assert gen[0, 3] == 2 and gen[0, 5] == 1 and gen.sum() == 3
    p = SamplingParams(temperature=2.0, alpha_presence=0.5, alpha_frequency=0.25,
                       alpha_presence_src=1.0, alpha_frequency_src=0.125)
    out = process(logits + 4.0, rows(p), gen=gen, src=src)[0]
    base = 2.0  # 4 / temperature: penalties come after temperature, unscaled
    assert out[3].item() == pytest.approx(base - (2 * 0.25 + 0.5))
    assert out[5].item() == pytest.approx(base - (0.25 + 0.5) - (0.125 + 1.0))
    assert out[7].item() == pytest.approx(base - (0.125 + 1.0))
    assert out[0].item() == pytest.approx(base)
    manual = apply_penalties(torch.zeros(1, V), gen, torch.tensor([0.5]), torch.tensor([0.25]))
    assert manual[0, 3].item() == pytest.approx(-1.0)


def test_source_tokens_up_to_the_end_index():
    prompt = [10, 11, 12, 13, 14]
    assert source_tokens(prompt, -1) == prompt
    assert source_tokens(prompt, 3) == [10, 11, 12]
    # Index counted in the prompt as sent: two tokens were cut from its left.
    assert source_tokens(prompt, 3, dropped=2) == [10]
    assert source_tokens(prompt, 1, dropped=2) == []


def test_min_tokens_blocks_eos_and_stop_tokens_only_before_it():
    logits = torch.zeros(2, V)
    rp = rows(SamplingParams(min_tokens=2), SamplingParams(min_tokens=0))
    early = process(logits, rp, n_generated=1, stop_ids=[(7,), (7,)])
    assert early[0, EOS_ID] == -math.inf and early[0, 7] == -math.inf
    assert torch.isfinite(early[1]).all()
    later = process(logits, rp, n_generated=2, stop_ids=[(7,), (7,)])
    assert torch.isfinite(later).all()


def test_dictionary_padding_is_never_produced():
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, DICT_SIZE + 3] = 100.0
    rp = rows(SamplingParams(temperature=0.0))
    out = process_logits(logits, rp, generated_counts=None, source_counts=None,
                         n_generated=torch.zeros(1), stop_ids=[()])
    assert torch.isinf(out[0, DICT_SIZE:]).all()
    assert sample(out, rp.top_p, rp.top_k, rp.greedy, torch.zeros(1)).item() < DICT_SIZE
    assert logits[0, DICT_SIZE + 3] == 100.0  # the caller's logits are not modified


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def draw_all(top_p=1.0, top_k=0, n=400):
    logits = PROBS.log().expand(n, -1)
    u = torch.arange(n, dtype=torch.float64) / n  # a uniform grid over [0, 1)
    return sample(logits, torch.full((n,), top_p), torch.full((n,), top_k, dtype=torch.long),
                  torch.zeros(n, dtype=torch.bool), u)


def test_inverse_cdf_sampling_follows_the_distribution():
    counts = torch.bincount(draw_all(), minlength=4).float() / 400
    assert torch.allclose(counts, PROBS[0], atol=1 / 400 + 1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    counts = torch.bincount(draw_all(top_p=0.6), minlength=4).float() / 400
    assert counts[2:].sum() == 0
    assert counts[0].item() == pytest.approx(0.5 / 0.8, abs=0.01)
    assert set(draw_all(top_p=0.5).tolist()) == {0}  # 0.5 alone reaches p
    assert set(draw_all(top_p=0.95).tolist()) == {0, 1, 2}
    assert set(draw_all(top_k=2).tolist()) == {0, 1}


def test_factual_nucleus_decays_per_row_and_resets_after_sentences():
    rp = rows(*[SamplingParams(top_p=0.9, lambda_decay=0.9, omega_bound=0.3)] * 4,
              SamplingParams(top_p=0.9))
    p = nucleus_top_p(rp, torch.tensor([0, 1, 2, 20, 5]))
    assert p.tolist() == pytest.approx([0.9, 0.81, 0.729, 0.3, 0.9])
    assert sentence_steps([]) == 0
    assert sentence_steps([50, 51, 52]) == 3
    for end in (4, 116, 328):  # ".", "?", "!"
        assert sentence_steps([50, end]) == 0 and sentence_steps([50, end, 60, 61]) == 2


def test_generators_are_reproducible_and_distinct_per_copy():
    a = torch.rand(4, generator=make_generator(7, 0))
    assert torch.equal(a, torch.rand(4, generator=make_generator(7, 0)))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(7, 1)))
    assert not torch.equal(torch.rand(4, generator=make_generator(7, 1)),
                           torch.rand(4, generator=make_generator(8, 0)))
    assert SamplingParams(seed=5).seeded().seed == 5
    assert isinstance(SamplingParams().seeded().seed, int)


def run(params, logits_seq, prompts):
    """Decode len(logits_seq) steps of a batch; logits_seq[t]: (B, V)."""
    generated = [[] for _ in params]
    gens = [make_generator(p.seed, 0) for p in params]
    rp = rows(*params)
    for logits in logits_seq:
        tokens, lp = next_tokens(logits, rp, generated=generated, sources=prompts,
                                 stop_ids=[(9,)] * len(params), generators=gens)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(len(params)))
        for g, t in zip(generated, tokens.tolist()):
            g.append(t)
    return generated


def test_a_request_samples_the_same_alone_or_in_any_batch():
    g = torch.Generator().manual_seed(3)
    steps = [torch.randn(3, V, generator=g) for _ in range(12)]
    mine = SamplingParams(seed=42, top_p=0.9, lambda_decay=0.9, alpha_presence=0.5,
                          alpha_frequency_src=0.3, min_tokens=2)
    others = [SamplingParams(temperature=0.0, alpha_frequency=1.0),
              SamplingParams(seed=1, temperature=1.3, top_k=5)]
    prompts = [[1, 2, 3], [4, 5], [6]]
    batch = run([others[0], mine, others[1]], steps, [prompts[1], prompts[0], prompts[2]])
    alone = run([mine], [s[1:2] for s in steps], [prompts[0]])
    assert batch[1] == alone[0]
    assert EOS_ID not in alone[0][:2] and 9 not in alone[0][:2]
    again = run([mine], [s[1:2] for s in steps], [prompts[0]])
    assert again == alone


def test_logprobs_helpers():
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(4))
    tokens = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(5))
    # Echo: position t's logits score token t + 1 (teacher forcing).
    scores = gather_logprobs(log_probs(logits[:, :-1]), tokens[:, 1:])
    expected = torch.log_softmax(logits[1, 2], -1)[tokens[1, 3]]
    assert scores.shape == (2, 4) and scores[1, 2].item() == pytest.approx(expected.item())
    values, ids = top_logprobs(log_probs(logits[0, 0]), 3)
    assert ids[0].item() == logits[0, 0].argmax().item() and (values[:-1] >= values[1:]).all()


def test_pick_best_ranks_by_total_logprob_stably():
    assert pick_best([-3.0, -1.0, -2.0, -1.0], 2) == [1, 3]
    assert pick_best([-1.0], 1) == [0]


def test_repetition_penalty_equals_hf_per_row():
    """Against HF's RepetitionPenaltyLogitsProcessor (an implementation we did not write),
    each row with its own penalty, the prompt and the output both counted."""
    processors = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6)) * 4
    prompts, generated = [[2, 5, 7], [2, 9], [2, 5]], [[7, 11], [], [13]]
    penalties = [1.3, 0.7, 1.0]
    rp = rows(*[SamplingParams(temperature=0.0, repetition_penalty=p) for p in penalties])
    _, lps = next_tokens(logits, rp, generated=generated, sources=[()] * 3,
                         stop_ids=[()] * 3, generators=[None] * 3, prompts=prompts)
    for b, penalty in enumerate(penalties):
        hf = processors.RepetitionPenaltyLogitsProcessor(penalty)
        ids = torch.tensor([prompts[b] + generated[b]])
        expected = torch.log_softmax(hf(ids, logits[b:b + 1].clone())[0], -1)
        torch.testing.assert_close(lps[b], expected, rtol=0, atol=1e-5)
    assert parse_request({"prompt": "x", "repetition_penalty": 1.2}).sampling \
        .repetition_penalty == 1.2
    with pytest.raises(RequestError):
        parse_request({"prompt": "x", "repetition_penalty": 0})
