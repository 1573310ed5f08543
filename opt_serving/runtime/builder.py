"""The one place the decoding stack is put together from the service's limits, so that
opt-serve, ``LLM`` and the in-process ``generate`` batch, chunk and page alike (one set of
defaults: ``constants.ServiceConstants``)."""

from __future__ import annotations

import torch

from constants import ServiceConstants
from opt_serving.decoding.scheduler import Scheduler
from opt_serving.model import KVCache, OPTModel

from .graphs import GraphRunner, default_buckets
from .runner import ModelRunner
from .sizing import CacheLayout


def build_scheduler(limits: ServiceConstants, layout: CacheLayout, *,
                    prefix_caching: bool = True) -> Scheduler:
    """The batching policy over ``layout``'s blocks: at most ``max_batch_size`` sequences,
    ``max_batch_tokens`` prompt tokens per step, ``max_seq_len`` positions per sequence."""
    return Scheduler(num_blocks=layout.num_blocks, block_size=layout.block_size,
                     max_seqs=limits.max_batch_size, max_queued=limits.max_queued_requests,
                     step_tokens=limits.max_batch_tokens, max_seq_len=limits.max_seq_len,
                     prefix_caching=prefix_caching)


def build_runner(model: OPTModel, layout: CacheLayout, limits: ServiceConstants, *,
                 cuda_graphs: bool = False, rows: int | None = None,
                 device: torch.device | None = None,
                 graph_factory=None) -> ModelRunner | GraphRunner:
    """The model and its KV cache for ``layout``; with ``cuda_graphs`` (on a GPU) a graph
    runner, its cache one scratch block larger, captured for batches up to ``rows`` (default:
    ``max_batch_size``). ``graph_factory`` replaces CUDA's (the tests' fake graphs: then the
    graph runner runs on a CPU too, with the batched step)."""
    param = next(model.parameters())
    device = device or param.device
    graphs = cuda_graphs and (device.type == "cuda" or graph_factory is not None)
    cache = KVCache(model.cfg, layout.num_blocks + graphs, layout.block_size,
                    dtype=param.dtype, device=device, tp_size=model.decoder.comm.size)
    runner = ModelRunner(model, cache, device, batched=True if graphs else None)
    if not graphs:
        return runner
    runner = GraphRunner(runner, default_buckets(rows or limits.max_batch_size),
                         scratch=layout.num_blocks,
                         max_blocks=-(-limits.max_seq_len // layout.block_size),
                         graphs=graph_factory)
    runner.capture()
    return runner
