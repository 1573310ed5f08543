"""``generate``: the server's decoding on one in-process model, no threads and no HTTP.

For scripts, benchmarks and tests that hold a model (``LLM`` is the same over a checkpoint,
with tensor-parallel workers). It runs the step the engine runs on a scheduler built by the
same builder, so greedy and seeded results equal the server's for the same options.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from constants import DEFAULTS, ServiceConstants
from opt_serving.decoding.step import Stepper
from opt_serving.model import OPTModel
from opt_serving.protocol import SamplingParams, SeqResult

from .builder import build_runner, build_scheduler
from .sizing import CacheLayout


def generate(model: OPTModel, prompts: Sequence[Sequence[int]],
             options: SamplingParams = SamplingParams(temperature=0.0), *,
             token_bytes: Callable[[int], bytes] | None = None,
             limits: ServiceConstants = DEFAULTS, kv_tokens: int | None = None,
             cuda_graphs: bool = False, graph_factory=None) -> list[SeqResult]:
    """Every sequence's result (``best_of`` per prompt, prompt by prompt) for token-id
    prompts; ``token_bytes`` (the tokenizer's) is needed for stop sequences. ``kv_tokens``:
    the KV cache (default: room for every sequence at once). ``cuda_graphs``: replay decode
    steps as opt-serve does on a GPU (``runtime.graphs``; ``graph_factory``: the tests' fake
    graphs)."""
    if options.stop and token_bytes is None:
        raise ValueError("stop sequences match on text: pass the tokenizer's token_bytes")
    limits = dataclasses.replace(limits, max_seq_len=min(limits.max_seq_len,
                                                         model.cfg.max_positions))
    longest = min(max(len(p) for p in prompts) + options.max_tokens + 1, limits.max_seq_len)
    bs = limits.kv_block_size
    blocks = (kv_tokens // bs if kv_tokens
              else len(prompts) * options.best_of * -(-longest // bs))
    layout = CacheLayout(blocks, bs)
    runner = build_runner(model, layout, limits, cuda_graphs=cuda_graphs,
                          rows=len(prompts) * options.best_of, graph_factory=graph_factory)
    scheduler = build_scheduler(limits, layout)
    stepper = Stepper(scheduler, runner.run, token_bytes or (lambda _: b""))
    seqs = scheduler.submit(prompts, options.seeded())
    results: dict[int, SeqResult] = {}
    with torch.inference_mode():
        while not scheduler.idle:
            for event in stepper.step(stepper.plan()):
                if event.error is not None:
                    raise event.error
                if event.result is not None:
                    results[event.seq.index] = event.result
    return [results[s.index] for s in seqs]
