"""``generate``: the server's decoding on one in-process model, no threads and no HTTP.

For scripts, benchmarks and tests that hold a model (``LLM`` is the same over a checkpoint,
with tensor-parallel workers). It runs the step the engine runs, so greedy and seeded
results equal the server's for the same options.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from opt_serving.model import KVCache, OPTModel
from opt_serving.protocol import SamplingParams

from .scheduler import Scheduler
from .sequence import SeqResult
from .step import Stepper
from .work import ModelRunner


def generate(model: OPTModel, prompts: Sequence[Sequence[int]],
             options: SamplingParams = SamplingParams(temperature=0.0), *,
             token_bytes: Callable[[int], bytes] | None = None, step_tokens: int = 512,
             block_size: int = 16, kv_tokens: int | None = None) -> list[SeqResult]:
    """Every sequence's result (``best_of`` per prompt, prompt by prompt) for token-id
    prompts; ``token_bytes`` (the tokenizer's) is needed for stop sequences. ``kv_tokens``:
    the KV cache (default: room for every sequence at once)."""
    if options.stop and token_bytes is None:
        raise ValueError("stop sequences match on text: pass the tokenizer's token_bytes")
    param = next(model.parameters())
    longest = min(max(len(p) for p in prompts) + options.max_tokens + 1,
                   model.cfg.max_positions)
    seqs = len(prompts) * options.best_of
    blocks = kv_tokens // block_size if kv_tokens else seqs * -(-longest // block_size)
    cache = KVCache(model.cfg, blocks, block_size, dtype=param.dtype, device=param.device,
                    tp_size=model.decoder.comm.size)
    scheduler = Scheduler(num_blocks=blocks, block_size=block_size, max_seqs=seqs,
                          max_queued=1, step_tokens=step_tokens,
                          max_seq_len=model.cfg.max_positions)
    stepper = Stepper(scheduler, ModelRunner(model, cache, param.device).run,
                      token_bytes or (lambda _: b""))
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

