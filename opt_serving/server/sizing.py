"""How big the KV cache and the HTTP thread pool are: from the flags, the device's free
memory (by the same planner as ``opt-capacity``) and the batch limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import torch

from constants import ServiceConstants
from opt_serving.capacity.planner import kv_cache_tokens
from opt_serving.config import DTYPES

if TYPE_CHECKING:
    from .serve import Plan, ServeOptions


class TooSmall(ValueError):
    """The KV cache could not hold a single sequence."""


@dataclass(frozen=True)
class CacheLayout:
    """The paged KV cache: ``num_blocks`` blocks of ``block_size`` positions."""

    num_blocks: int
    block_size: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @classmethod
    def from_tokens(cls, tokens: int, c: ServiceConstants) -> "CacheLayout":
        blocks = tokens // c.kv_block_size
        if blocks * c.kv_block_size < 8:
            raise TooSmall(f"the KV cache would hold only {tokens} tokens: not enough for "
                           "a sequence. Free GPU memory, use more model-parallel ranks, or "
                           "pass --kv-tokens")
        return cls(blocks, c.kv_block_size)


def http_threads(options: "ServeOptions") -> int:
    """Each open request holds an HTTP worker thread while it waits: enough of them that
    they, not the KV cache, never bound the batch."""
    c = options.constants
    return options.threads or min(c.max_batch_size, 1024) + c.max_queued_requests


CPU_SEQUENCES = 8


def kv_tokens(plan: "Plan", model, device: torch.device) -> int:
    """KV-cache positions this rank allocates: --kv-tokens, else from free memory."""
    c = plan.options.constants
    if plan.options.kv_tokens:
        return plan.options.kv_tokens
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dtype_bytes = torch.empty((), dtype=DTYPES[plan.dtype]).element_size()
    if device.type != "cuda":
        # CPU: a quarter of the available RAM, at most 8 full-length sequences (metaseq's
        # MAX_BATCH_TOKENS alone would hold one long sequence: no batching at all).
        ram = psutil.virtual_memory().available // 4 // max(1, plan.world_size)
        fit = kv_cache_tokens(plan.cfg, plan.world_size, ram + weights, dtype_bytes,
                              c.max_batch_tokens, weight_bytes=weights)
        return max(c.max_batch_tokens, min(fit, CPU_SEQUENCES * c.max_seq_len))
    free, _ = torch.cuda.mem_get_info(device)
    # One source of truth with opt-capacity: free memory as if the weights were not loaded.
    return kv_cache_tokens(plan.cfg, plan.world_size, free + torch.cuda.memory_allocated(device),
                           dtype_bytes, c.max_batch_tokens, weight_bytes=weights)
