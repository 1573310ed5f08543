"""One rank's model and KV cache, and the forward it runs for each step.

The model runner owns the device and the cache (nano-vllm's ``model_runner``): nothing above
it knows how a step's tensors reach the model, so a graph runner can wrap ``run`` without the
engine or the step noticing.
"""

from __future__ import annotations

from typing import Protocol

import torch

from opt_serving.decoding.work import StepWork
from opt_serving.model import AttentionRows, KVCache, OPTModel, packed_positions


class StepRunner(Protocol):
    """What the engine and the worker loop step: ``ModelRunner``, or ``graphs.GraphRunner``
    wrapping one."""

    def run(self, work: StepWork) -> torch.Tensor: ...


class ModelRunner:
    """One rank's model and KV cache; runs a StepWork as one packed forward.

    ``batched`` (default: on a GPU): the step's decode rows are attended in one call per layer
    (``attention.paged_decode``) and its host-side tensors are built at once; otherwise (the
    CPU engine) every sequence is attended on its own, reading its keys in place."""

    def __init__(self, model: OPTModel, cache: KVCache, device: torch.device,
                 batched: bool | None = None):
        self.model, self.cache, self.device = model, cache, device
        self.batched = device.type == "cuda" if batched is None else batched

    @torch.inference_mode()
    def run(self, work: StepWork) -> torch.Tensor:
        """Logits (S, V) at the selected rows, on the device."""
        dev, bs = self.device, self.cache.block_size
        if self.batched:
            packed = packed_positions(work.starts, work.lengths)  # (seq, pos), each (N,)
            rows = AttentionRows.build_batched(work.starts, work.lengths, work.tables, bs, dev,
                                               packed)
            positions = packed[1]
        else:
            starts, lengths = work.starts.tolist(), work.lengths.tolist()
            rows = AttentionRows.build(starts, lengths, work.tables.tolist(), bs, dev)
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
        return self.model.step(work.tokens.to(dev), positions.to(dev), self.cache, rows,
                               work.select.to(dev))
