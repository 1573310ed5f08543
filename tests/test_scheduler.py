"""The batching policy, driven by a fake model that records what lands in each cache slot."""

import pytest
from hypothesis import given, settings, strategies as st

from opt_serving.config import EOS_ID
from opt_serving.decoding.scheduler import (
    FINISHED, RUNNING, WAITING, QueueFull, Scheduler, fit_prompt)
from opt_serving.protocol import RequestError, SamplingParams


def opts(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def make(**kw) -> Scheduler:
    args = dict(num_slots=4, slot_len=64, max_queued=8, step_tokens=16)
    return Scheduler(**{**args, **kw})


def fake_token(seq) -> int:
    """A deterministic 'model': the next token depends on the sequence and its length."""
    return 1000 + seq.id * 100 + len(seq.generated)


def step(s: Scheduler, cache: dict) -> list:
    """One engine iteration; returns the sequences that finished."""
    s.admit()
    plan = s.step_plan()
    longest = max((len(r.tokens) for r in plan.prefill), default=0)
    assert all(r.start + longest <= s.slot_len for r in plan.prefill)  # paddable
    for row in plan.rows:
        slot = cache.setdefault(row.slot, {})
        for i, t in enumerate(row.tokens):
            slot[row.start + i] = t
    sampled = {r.seq.id: fake_token(r.seq) for r in plan.rows if r.last and r.seq.max_tokens}
    s.commit(plan, sampled)
    done = [r.seq for r in plan.rows
            if r.last and len(r.seq.generated) >= r.seq.max_tokens]
    for seq in done:
        s.finish(seq)
    return done


def test_fit_prompt_keeps_the_tail_like_metaseq():
    assert fit_prompt(range(10), 5, 2048) == (tuple(range(10)), 0)
    kept, dropped = fit_prompt(list(range(3000)), 48, 2048)
    assert len(kept) == 2048 - 48 - 1 and kept[-1] == 2999 and dropped == 3000 - 1999
    with pytest.raises(RequestError) as err:
        fit_prompt([1, 2], 2047, 2048)
    assert err.value.param == "max_tokens"


def test_submit_prepends_eos_and_reports_truncation():
    s = make(slot_len=32)
    (seq,) = s.submit([list(range(100, 140))], opts(10))
    assert seq.prompt[0] == EOS_ID and len(seq.prompt) == 32 - 10
    assert seq.truncated == 40 - 21 and seq.prompt[-1] == 139
    assert seq.state == WAITING and s.queued_requests == 1


def test_admission_waits_for_slots_and_budget_first_come_first_served():
    s = make(num_slots=3, slot_len=64, kv_budget=100)
    a, = s.submit([[5] * 39], opts(20))  # reserves 60
    b, = s.submit([[6] * 29], opts(20))  # 50: does not fit next to a
    c, = s.submit([[7] * 4], opts(5))  # 10: would fit, but b is older
    assert s.admit() == [a] and a.state == RUNNING and a.slot == 0
    assert s.admit() == [] and s.reserved_tokens == 60
    s.finish(a)
    assert s.admit() == [b, c] and (b.slot, c.slot) == (0, 1)
    assert s.reserved_tokens == 60 and s.free_slots == 1


def test_queue_bound_counts_requests_and_rejects_atomically():
    s = make(max_queued=2)
    s.submit([[1], [1], [1]], opts(1))  # one request of three sequences
    s.submit([[2]], opts(1))
    with pytest.raises(QueueFull):
        s.submit([[3]], opts(1))
    assert len(s.waiting) == 4
    s.admit()  # everything fits: the queue empties
    s.submit([[3]], opts(1))
    with pytest.raises(RequestError):
        s.submit([[4], [5]], opts(100))  # too long for a 64-token slot: nothing queued
    assert s.queued_requests == 1


def test_long_prompts_prefill_in_chunks_while_others_decode():
    s = make(step_tokens=8)
    short, = s.submit([[9, 9]], opts(5))
    step(s, {})  # short prefills its 3 tokens and samples its first token
    assert short.generated == [fake_token(short) - 1] and short.cached == 3
    long, = s.submit([list(range(20))], opts(3))
    assert s.admit() == [long]  # joins the running batch mid-flight
    plan = s.step_plan()
    assert [(r.seq, r.start, len(r.tokens), r.last) for r in plan.prefill] == [
        (long, 0, 8, False)]
    assert [(r.seq, r.slot, r.start, r.tokens) for r in plan.decode] == [
        (short, short.slot, 3, (short.generated[-1],))]
    s.commit(plan, {short.id: 5})
    assert (long.cached, long.generated, short.cached, short.generated[-1]) == (8, [], 4, 5)
    steps = 0
    while long.prefilling:
        plan = s.step_plan()
        assert plan.decode  # short keeps decoding while the long prompt goes in
        s.commit(plan, {r.seq.id: 6 for r in plan.rows if r.last})
        steps += 1
    assert steps == 2 and long.generated == [6]  # 8 + 8 + 5 tokens


def test_prefill_chunks_fit_every_row_when_padded():
    s = make(num_slots=2, slot_len=40, step_tokens=28)
    near_end, = s.submit([list(range(30))], opts(5))
    step(s, {})
    assert near_end.cached == 28
    fresh, = s.submit([list(range(30))], opts(5))
    s.admit()
    plan = s.step_plan()
    # Without the cap fresh would take 25 tokens: padded, near_end would reach position 53.
    assert [len(r.tokens) for r in plan.prefill] == [3, 12]
    longest = max(len(r.tokens) for r in plan.prefill)
    assert all(r.start + longest <= s.slot_len for r in plan.prefill)


def test_cancel_frees_slots_and_a_running_step_ignores_the_cancelled():
    s = make(num_slots=1)
    a, = s.submit([[1, 2]], opts(4))
    b, = s.submit([[3]], opts(4))
    s.admit()
    plan = s.step_plan()
    assert s.cancel(a.group) == [a] and a.state == FINISHED
    s.commit(plan, {a.id: 77})
    assert a.generated == [] and s.free_slots == 1
    assert s.cancel(b.group) == [b] and s.idle


@settings(max_examples=40, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 12), st.integers(0, 6)),
                     min_size=1, max_size=12),
       slots=st.integers(1, 4), budget=st.integers(60, 200), step_tokens=st.integers(1, 24))
def test_random_workloads_write_every_token_once_in_place(jobs, slots, budget, step_tokens):
    """jobs: (prompt length, max_tokens, arrival step)."""
    s = Scheduler(num_slots=slots, slot_len=64, max_queued=100, step_tokens=step_tokens,
                  kv_budget=budget)
    cache, finished, seqs = {}, [], []
    for t in range(2000):
        for plen, max_tokens, arrive in jobs:
            if arrive == t:
                seqs += s.submit([[7] * plen], opts(max_tokens))
        s.admit()
        assert len({q.slot for q in s.running}) == len(s.running)
        assert s.reserved_tokens <= s.kv_budget
        finished += step(s, cache) if s.running else []
        for q in s.running + finished:
            # Every position of the slot holds what the model was fed there, once.
            known = list(q.prompt) + q.generated
            if q.state == RUNNING:
                assert [cache[q.slot][i] for i in range(q.cached)] == known[:q.cached]
        if s.idle and t > max(a for _, _, a in jobs):
            break
    assert s.idle and len(finished) == len(seqs)
    for q in seqs:
        assert len(q.generated) == q.max_tokens
        assert q.generated == [1000 + q.id * 100 + i for i in range(q.max_tokens)]
        assert q.reserve <= s.context_len
