"""The GPU path's parts, checked on a CPU: the Triton paged-decode kernel under Triton's
interpreter (``TRITON_INTERPRET=1``, set by conftest.py) against the CPU engine's own attention, the batched step builder against the
per-sequence one, the lower-right causal prefill against an explicit mask, and the graph
runner with an injected fake graph against the eager step."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from opt_serving.attention import paged_decode as pd
from opt_serving.config import get_preset
from opt_serving.decoding.work import StepWork
from opt_serving.model import AttentionRows, KVCache, OPTModel, attend, init_random
from opt_serving.runtime.graphs import GraphRunner, default_buckets
from opt_serving.runtime.runner import ModelRunner

BS = 16


@pytest.fixture(scope="module")
def kernel():
    if pd.triton is None:
        pytest.skip("triton is not installed (it comes with CUDA builds of torch; on a CPU: "
                    "pip install triton)")
    assert pd.INTERPRETING, "conftest.py sets TRITON_INTERPRET=1 before triton is imported"
    return pd


def ragged_case(rng: random.Random, heads: int, head_dim: int, padded: int = 0):
    """Random sequences of 1..40 keys on shuffled blocks of one cache, plus ``padded`` rows
    pointing at the scratch block (the last one) with one key."""
    lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 5))]
    blocks = sum(-(-n // BS) for n in lens) + 3
    order = list(range(blocks - 1))
    rng.shuffle(order)
    tables, at = [], 0
    for n in lens:
        k = -(-n // BS)
        tables.append(order[at:at + k])
        at += k
    tables += [[blocks - 1]] * padded
    lens += [1] * padded
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    k = torch.randn(heads, blocks * BS, head_dim, generator=gen)
    v = torch.randn(heads, blocks * BS, head_dim, generator=gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    return q, k, v, tables, lens


def cpu_attention(q, k, v, tables, lens):
    """The CPU engine's own path: one decode row per sequence, attended one by one."""
    rows = AttentionRows.build([n - 1 for n in lens], [1] * len(lens), tables, BS, "cpu")
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2])
    attend(q.transpose(0, 1), k, v, rows, out)
    return out.transpose(0, 1)


def padded_tables(tables):
    width = max(len(t) for t in tables)
    return torch.tensor([[*t, *[0] * (width - len(t))] for t in tables])


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_the_kernel_equals_the_cpu_engines_attention(kernel, head_dim, splits):
    rng = random.Random(head_dim * 10 + splits)
    for _ in range(3):
        q, k, v, tables, lens = ragged_case(rng, heads=2, head_dim=head_dim, padded=1)
        got = kernel.paged_decode(q, k, v, padded_tables(tables), torch.tensor(lens), BS,
                                  splits=splits)
        torch.testing.assert_close(got, cpu_attention(q, k, v, tables, lens),
                                   atol=2e-5, rtol=1e-5)


def test_the_kernel_in_fp16_reads_fp16_caches(kernel):
    q, k, v, tables, lens = ragged_case(random.Random(3), heads=2, head_dim=64)
    q, k, v = q.half(), k.half(), v.half()
    got = kernel.paged_decode(q, k, v, padded_tables(tables), torch.tensor(lens), BS)
    want = cpu_attention(q.float(), k.float(), v.float(), tables, lens)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_the_fixed_shape_fallback_equals_the_cpu_engines_attention():
    rng = random.Random(7)
    for head_dim in (64, 80):
        q, k, v, tables, lens = ragged_case(rng, heads=3, head_dim=head_dim, padded=2)
        got = pd.gathered(q, k, v, padded_tables(tables), torch.tensor(lens), BS)
        torch.testing.assert_close(got, cpu_attention(q, k, v, tables, lens),
                                   atol=1e-5, rtol=1e-5)


def test_lower_right_causal_equals_the_explicit_mask():
    gen = torch.Generator().manual_seed(0)
    for start, n in ((5, 7), (16, 1), (30, 12)):
        end = start + n
        q = torch.randn(1, 4, n, 64, generator=gen)
        k, v = torch.randn(1, 4, end, 64, generator=gen), torch.randn(1, 4, end, 64,
                                                                       generator=gen)
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, end))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# -- the step on a model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return init_random(OPTModel(get_preset("tiny-8h")), seed=11).eval()


def _prefilled(model, blocks: int = 24):
    """A cache holding three sequences' prompts (5, 20 and 33 tokens) on scattered blocks,
    computed by the CPU path; returns the runner and the sequences' (tokens, table)."""
    cache = KVCache(model.cfg, blocks + 1, BS)  # + the scratch block
    runner = ModelRunner(model, cache, torch.device("cpu"), batched=False)
    gen = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(4, 1000, (n,), generator=gen).tolist(), table)
            for n, table in ((5, [7]), (20, [2, 9]), (33, [4, 5, 12]))]
    for tokens, table in seqs:
        runner.run(_work([(0, tokens, table)], select_last=True))
    return runner, seqs


def _work(rows, select_last=True) -> StepWork:
    """rows: (start, tokens, table); logits at each row's last token."""
    width = max(len(t) for _, _, t in rows)
    lengths = [len(tok) for _, tok, _ in rows]
    ends = torch.cumsum(torch.tensor(lengths), 0) - 1
    return StepWork(tokens=torch.tensor([t for _, tok, _ in rows for t in tok]),
                    starts=torch.tensor([s for s, _, _ in rows]),
                    lengths=torch.tensor(lengths),
                    tables=torch.tensor([[*t, *[-1] * (width - len(t))] for _, _, t in rows]),
                    select=ends)


def _clone(runner, batched=None):
    cache = KVCache(runner.model.cfg, runner.cache.num_blocks, BS)
    for i in range(len(cache.k)):
        cache.k[i].copy_(runner.cache.k[i])
        cache.v[i].copy_(runner.cache.v[i])
    return ModelRunner(runner.model, cache, torch.device("cpu"), batched=batched)


def test_the_batched_step_equals_the_per_sequence_step(model):
    """Decode rows first, then a chunk that continues a sequence and one from position 0:
    the GPU path's builder (batched decode attention, lower-right causal chunks, write rows
    computed at once) against the CPU path's."""
    base, seqs = _prefilled(model)
    (a, ta), (b, tb), (c, tc) = seqs
    step = _work([(5, [17], ta), (20, [23], tb), (33, [41, 42, 43, 44, 45, 46], tc + [13]),
                  (0, [8, 9, 10], [20])])
    eager, batched = _clone(base, batched=False), _clone(base, batched=True)
    rows = AttentionRows.build_batched(step.starts, step.lengths, step.tables, BS, "cpu")
    assert rows.decode == 2 and len(rows.spans) == 2
    torch.testing.assert_close(batched.run(step), eager.run(step), atol=1e-5, rtol=1e-5)
    for layer in range(model.cfg.num_layers):
        torch.testing.assert_close(batched.cache.k[layer], eager.cache.k[layer])


class FakeGraphs:
    """Capture records the function; replay calls it again on the same static buffers."""

    def __init__(self):
        self.captured = []

    def warm_up(self, fn):
        fn()

    def capture(self, fn):
        self.captured.append(fn)
        return _Replayed(fn, fn())

    def memory(self) -> int:
        return 0


class _Replayed:
    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        self.output.copy_(self.fn())


def test_the_graph_runner_replays_decode_steps_like_the_eager_step(model):
    base, seqs = _prefilled(model)
    scratch = base.cache.num_blocks - 1
    graphs = FakeGraphs()
    runner = GraphRunner(_clone(base, batched=True), (1, 2, 4, 8), scratch=scratch,
                         max_blocks=8, graphs=graphs)
    stats = runner.capture()
    assert stats.buckets == (1, 2, 4, 8) and len(graphs.captured) == 4
    eager = _clone(base, batched=False)
    # Capture wrote only on the scratch block: the caches still agree everywhere.
    for layer in range(model.cfg.num_layers):
        torch.testing.assert_close(runner.cache.k[layer][:, :scratch * BS],
                                   eager.cache.k[layer][:, :scratch * BS])
    (a, ta), (b, tb), (c, tc) = seqs
    step = _work([(5, [17], ta), (20, [23], tb), (33, [41], tc)])
    assert runner.bucket_for(step) == 4  # the smallest bucket that holds 3 rows
    got, want = runner.run(step), eager.run(step)
    assert runner.replays == 1 and got.shape == want.shape == (3, model.cfg.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for layer in range(model.cfg.num_layers):  # every row outside the scratch block agrees
        torch.testing.assert_close(runner.cache.k[layer][:, :scratch * BS],
                                   eager.cache.k[layer][:, :scratch * BS])
        torch.testing.assert_close(runner.cache.v[layer][:, :scratch * BS],
                                   eager.cache.v[layer][:, :scratch * BS])


def test_other_steps_run_eagerly(model):
    base, seqs = _prefilled(model)
    runner = GraphRunner(_clone(base, batched=True), (1, 2), scratch=base.cache.num_blocks - 1,
                         max_blocks=8, graphs=FakeGraphs())
    runner.capture()
    (a, ta), (b, tb), (c, tc) = seqs
    mixed = _work([(5, [17], ta), (20, [23, 24], tb)])  # a two-token chunk
    too_many = _work([(5, [17], ta), (20, [23], tb), (33, [41], tc)])  # past bucket 2
    echo = StepWork(mixed.tokens[:1], mixed.starts[:1], torch.tensor([1]), mixed.tables[:1],
                    torch.tensor([0, 0]))  # logits wanted twice: not a plain decode step
    for work in (mixed, too_many, echo):
        assert runner.bucket_for(work) is None
    runner.run(mixed)
    runner.run(too_many)
    assert runner.replays == 0


def test_default_buckets():
    assert default_buckets(2048) == (1, 2, 4, *range(8, 257, 8))
    assert default_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert default_buckets(3) == (1, 2, 3)


def _run_requests(model, graphs):
    """Two requests through the engine's own stack (builder, scheduler, step): three
    prompts wanting 6 tokens and two wanting 3, greedy. Returns every sequence's ids."""
    from constants import DEFAULTS
    from opt_serving.decoding.step import Stepper
    from opt_serving.protocol import SamplingParams
    from opt_serving.runtime.builder import build_runner, build_scheduler
    from opt_serving.runtime.sizing import CacheLayout

    layout = CacheLayout(24, BS)
    runner = build_runner(model, layout, DEFAULTS, cuda_graphs=graphs is not None, rows=5,
                          graph_factory=graphs)
    scheduler = build_scheduler(DEFAULTS, layout)
    stepper = Stepper(scheduler, runner.run, lambda _: b"")
    seqs = [*scheduler.submit([[5, 100, 9], [6, 107], [7]],
                              SamplingParams(max_tokens=6, temperature=0).seeded()),
            *scheduler.submit([[8, 114, 9, 44], [9]],
                              SamplingParams(max_tokens=3, temperature=0).seeded())]
    with torch.no_grad():
        while not scheduler.idle:
            stepper.step(stepper.plan())
    return [list(s.generated) for s in seqs], runner


def test_decoding_with_replayed_graphs_equals_the_eager_engine(model):
    """The whole decode loop on the graph runner (fake graphs): five rows replay bucket 5,
    then the second request finishes and three rows replay bucket 4 with a padded row on the
    scratch block; prompts are prefilled eagerly. The ids equal the CPU engine's."""
    with torch.no_grad():
        model.decoder.layer_norm.weight.mul_(20)  # peaked, like a trained model
    try:
        eager, _ = _run_requests(model, None)
        graphs = FakeGraphs()
        replayed, runner = _run_requests(model, graphs)
    finally:
        with torch.no_grad():
            model.decoder.layer_norm.weight.div_(20)
    assert len(graphs.captured) == len(default_buckets(5)) == 4  # 5, 4, 2, 1
    assert replayed == eager and [len(g) for g in eager] == [6, 6, 6, 3, 3]
    assert runner.replays >= 4  # the decode steps, both buckets
