"""The batching policy and the paged cache's bookkeeping, driven by a fake model that records
what lands at each cache position (no tensors, no threads)."""

import pytest
from hypothesis import given, settings, strategies as st

from opt_serving.config import EOS_ID
from opt_serving.decoding.blocks import BlockPool, chain_digests
from opt_serving.decoding.scheduler import (
    FINISHED, RUNNING, WAITING, QueueFull, Scheduler, fit_prompt)
from opt_serving.protocol import RequestError, SamplingParams

BS = 4  # block size of these tests


def opts(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


def make(**kw) -> Scheduler:
    args = dict(num_blocks=64, block_size=BS, max_seqs=4, max_queued=8, step_tokens=16,
                max_seq_len=64)
    return Scheduler(**{**args, **kw})


def fake_token(seq) -> int:
    """A deterministic 'model': the next token depends on the sequence and its length."""
    return 1000 + seq.id * 100 + len(seq.generated)


def step(s: Scheduler, cache: dict) -> list:
    """One engine iteration on a fake cache {(block, offset): token}; checks that every row
    reads back, through its block table, exactly the tokens the sequence has; returns the
    sequences that finished."""
    s.admit()
    plan = s.step_plan()
    for row in plan.rows:
        seq = row.seq
        for i, t in enumerate(row.tokens):
            p = row.start + i
            cache[row.blocks[p // BS], p % BS] = t
        known = seq.tokens(0, row.start + len(row.tokens))
        assert [cache[row.blocks[p // BS], p % BS] for p in range(len(known))] == list(known)
    sampled = {r.seq.id: fake_token(r.seq) for r in plan.rows if r.last and r.seq.max_tokens}
    s.commit(plan, sampled)
    done = [r.seq for r in plan.rows if r.last and r.seq.state == RUNNING
            and len(r.seq.generated) >= r.seq.max_tokens]
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
    s = make(max_seq_len=32)
    (seq,) = s.submit([list(range(100, 140))], opts(10))
    assert seq.prompt[0] == EOS_ID and len(seq.prompt) == 32 - 10
    assert seq.truncated == 40 - 21 and seq.prompt[-1] == 139
    assert seq.state == WAITING and s.queued_requests == 1


def test_a_sequence_holds_blocks_for_its_tokens_not_for_max_seq_len():
    s = make(num_blocks=16, max_seq_len=64)
    a, = s.submit([[5] * 5], opts(40))  # 6 tokens: 2 blocks now, up to 12 later
    b, = s.submit([[6] * 9], opts(40))  # 10 tokens: 3 blocks
    assert s.admit() == [a, b] and (len(a.blocks), len(b.blocks)) == (2, 3)
    assert s.pool.used == 5  # two fixed rows of max_seq_len would hold 2 x 16 blocks


def test_admission_is_first_come_first_served():
    s = make(num_blocks=10)
    a, = s.submit([[5] * 23], opts(4))  # 24 tokens: 6 blocks
    b, = s.submit([[6] * 19], opts(4))  # 5 blocks: does not fit next to a
    c, = s.submit([[7] * 3], opts(4))  # 1 block: would fit, but b is older
    assert s.admit() == [a] and s.admit() == []
    s.finish(a)
    assert s.admit() == [b, c]


def test_queue_bound_counts_requests_and_rejects_atomically():
    s = make(max_queued=2)
    s.submit([[1], [1], [1]], opts(1))  # one request of three sequences
    s.submit([[2]], opts(1))
    with pytest.raises(QueueFull):
        s.submit([[3]], opts(1))
    assert len(s.waiting) == 4
    s.admit()
    s.submit([[3]], opts(1))
    with pytest.raises(RequestError):
        s.submit([[4], [5]], opts(100))  # longer than max_seq_len 64: nothing queued
    assert s.queued_requests == 1


def test_one_step_packs_decodes_and_prompt_chunks():
    s = make(step_tokens=8)
    short, = s.submit([[9, 9]], opts(5))
    step(s, {})  # short prefills its 3 tokens and samples its first token
    assert short.generated == [fake_token(short) - 1] and short.cached == 3
    long, = s.submit([list(range(20))], opts(3))
    assert s.admit() == [long]  # joins the running batch mid-flight
    plan = s.step_plan()
    assert [(r.seq, r.start, len(r.tokens), r.last) for r in plan.rows] == [
        (short, 3, 1, True), (long, 0, 8, False)]  # decoding rows first, one forward
    s.commit(plan, {short.id: 5})
    assert (long.cached, long.generated, short.cached, short.generated[-1]) == (8, [], 4, 5)
    steps = 0
    while long.cached < len(long.prompt):
        plan = s.step_plan()
        assert plan.rows[0].seq is short  # short keeps decoding while the long prompt goes in
        s.commit(plan, {r.seq.id: 6 for r in plan.rows if r.last})
        steps += 1
    assert steps == 2 and long.generated == [6]  # 8 + 8 + 5 tokens


def test_a_full_pool_preempts_the_youngest_and_it_resumes_where_it_was():
    s = make(num_blocks=5, max_seqs=2)
    old, = s.submit([[1] * 6], opts(8))  # 7 tokens: 2 blocks, grows to 4
    young, = s.submit([[2] * 6], opts(8))
    cache, finished = {}, []
    while not s.idle:
        finished += step(s, cache)
    assert s.preempted >= 1 and young.preemptions >= 1 and old.preemptions == 0
    assert finished[0] is old
    for seq in (old, young):  # the same tokens as without any preemption
        assert seq.generated == [1000 + seq.id * 100 + i for i in range(8)]


def test_a_prefix_is_computed_once_and_shared_by_later_prompts():
    s = make(num_blocks=32)
    history = list(range(100, 118))  # 19 tokens with </s>: 4 full blocks
    first, = s.submit([history + [7, 8]], opts(2))
    cache = {}
    while not s.idle:
        step(s, cache)
    second, = s.submit([history + [9]], opts(2))
    s.admit()
    assert second.cached == 16 and s.pool.hit_tokens == 16  # four blocks not computed again
    plan = s.step_plan()
    assert [(r.start, len(r.tokens)) for r in plan.rows] == [(16, 4)]
    echo, = s.submit([history + [9]], opts(0, echo=True))  # scored afresh: nothing shared
    s.admit()
    assert echo.cached == 0


def test_prompts_sent_together_compute_their_shared_history_once():
    s = make(num_blocks=64, step_tokens=64)
    history = list(range(100, 135))  # 36 tokens with </s>: 9 full blocks of 4
    a, b, c = (s.submit([history + [i]], opts(2))[0] for i in (7, 8, 9))
    other, = s.submit([[5] * 20], opts(2))
    assert s.admit() == [a, other]  # b and c wait for a's blocks; other goes ahead
    step(s, {})
    assert s.admit() == [b, c] and b.cached == c.cached == 36 and s.pool.hit_tokens == 72
    plan = s.step_plan()  # each computes only its own last token
    assert [(r.seq, len(r.tokens)) for r in plan.rows if r.seq in (b, c)] == [(b, 1), (c, 1)]


def test_the_prefix_cache_evicts_least_recently_used_blocks_only_when_full():
    pool = BlockPool(num_blocks=3, block_size=2)
    digests = chain_digests([1, 2, 3, 4], 2)
    a = pool.allocate(0, None)
    b = pool.allocate(0, a)
    pool.register(a, digests[0])
    pool.register(b, digests[1])
    pool.release(0, [a, b])
    assert pool.available == 3 and pool.used == 0
    assert pool.lookup(digests) == [a, b] and pool.refs[a] == 1  # held again
    pool.release(1, [a, b])
    third = pool.allocate(2, None)  # the one free block first: the cached ones stay
    assert third not in (a, b) and pool.match_length(digests) == 2
    fourth = pool.allocate(2, third)  # now the least recently used cached block goes
    assert fourth == a and pool.match_length(digests) == 0


def test_homes_are_runs_of_free_blocks_that_others_leave_alone():
    pool = BlockPool(num_blocks=20, block_size=1)
    taken = [pool.allocate(99, None) for _ in range(20)]
    assert sorted(taken) == list(range(20)) and not pool.open
    for run in ([2, 3], [6, 7, 8, 9], [12, 13, 14]):  # free runs of 2, 4 and 3 blocks
        pool.release(99, run)
    pool.plan_home(1, None, 3)
    home = pool.homes[1]
    assert len(home) == 3 and set(home) <= pool.free  # three consecutive free blocks
    pool.plan_home(2, None, 4)
    assert (2 in pool.homes) == (home.start == 12)  # the run of 4 unless 1's home is in it
    assert not set(home) & set(pool.homes.get(2, ()))
    first = pool.allocate(1, None)
    assert first == home.start and pool.allocate(1, first) == home.start + 1  # grows in place
    homed = set(pool.home_of)
    assert pool.open == pool.free - homed and pool.open
    stranger = pool.allocate(3, None)  # no home: a free block in no one's home
    assert stranger not in homed and stranger not in pool.free
    pool.plan_home(4, None, 5)
    assert 4 not in pool.homes  # no run of 5 open blocks: it grows wherever there is room
    pool.release(1, [first])  # 1's home goes back to everyone
    assert pool.open == {b for b in pool.free if b not in pool.home_of}


def test_digests_cover_everything_before_the_block():
    one = chain_digests([1, 2, 3, 4], 2)
    other = chain_digests([9, 2, 3, 4], 2)
    assert one[1] != other[1]  # same block tokens, different history
    assert chain_digests([1, 2, 3, 4, 5], 2) == one  # partial blocks are not keyed
    assert chain_digests([3, 4], 2, one[0]) == one[1:]  # carried on from block 0


def test_cancel_frees_blocks_and_a_running_step_ignores_the_cancelled():
    s = make(max_seqs=1)
    a, = s.submit([[1, 2]], opts(4))
    b, = s.submit([[3]], opts(4))
    s.admit()
    plan = s.step_plan()
    assert s.cancel(a.group) == [a] and a.state == FINISHED
    s.commit(plan, {a.id: 77})
    assert a.generated == [] and s.pool.used == 0
    assert s.cancel(b.group) == [b] and s.idle


@settings(max_examples=40, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 12), st.integers(0, 6)),
                     min_size=1, max_size=12),
       blocks=st.integers(13, 40), max_seqs=st.integers(1, 6), step_tokens=st.integers(1, 24),
       shared=st.booleans())
def test_random_workloads_read_back_what_they_wrote(jobs, blocks, max_seqs, step_tokens,
                                                    shared):
    """jobs: (prompt length, max_tokens, arrival step); prompts of 7s share prefixes. Every
    row reads back its own tokens through its block table (checked in ``step``), under
    preemption and prefix sharing, and every sequence generates what it would alone."""
    s = Scheduler(num_blocks=blocks, block_size=BS, max_seqs=max_seqs, max_queued=100,
                  step_tokens=step_tokens, max_seq_len=52, prefix_caching=shared)
    cache, finished, seqs = {}, [], []
    for t in range(3000):
        for plen, max_tokens, arrive in jobs:
            if arrive == t:
                seqs += s.submit([[7] * plen], opts(max_tokens))
        finished += step(s, cache)
        held = [b for q in s.running for b in q.blocks]
        exclusive = [b for q in s.running for b in q.blocks[q.cached // BS:]]
        assert len(set(exclusive)) == len(exclusive)  # blocks still written are not shared
        assert all(s.pool.refs[b] >= 1 for b in held)
        assert s.pool.open == {b for b in s.pool.free if b not in s.pool.home_of}
        if s.idle and t > max(a for _, _, a in jobs):
            break
    assert s.idle and len(finished) == len(seqs) and s.pool.used == 0
    for q in seqs:
        assert q.generated == [1000 + q.id * 100 + i for i in range(q.max_tokens)]
