"""The one place the decoding stack is put together from the service's limits, so that
opt-serve, ``LLM`` and the in-process ``generate`` batch, chunk and page alike (one set of
defaults: ``constants.ServiceConstants``)."""

from __future__ import annotations

from constants import ServiceConstants
from opt_serving.decoding.scheduler import Scheduler

from .sizing import CacheLayout


def build_scheduler(limits: ServiceConstants, layout: CacheLayout, *,
                    prefix_caching: bool = True) -> Scheduler:
    """The batching policy over ``layout``'s blocks: at most ``max_batch_size`` sequences,
    ``max_batch_tokens`` prompt tokens per step, ``max_seq_len`` positions per sequence."""
    return Scheduler(num_blocks=layout.num_blocks, block_size=layout.block_size,
                     max_seqs=limits.max_batch_size, max_queued=limits.max_queued_requests,
                     step_tokens=limits.max_batch_tokens, max_seq_len=limits.max_seq_len,
                     prefix_caching=prefix_caching)
