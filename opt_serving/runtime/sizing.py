"""How big the KV cache is, and the one per-sequence limit that follows from it.

The cache's size comes from ``--kv-tokens`` or the device's free memory (by the same planner
as ``opt-capacity``); it is checked against what the device can hold *before* anything is
allocated. The effective per-sequence limit is computed once here, from ``--max-seq-len``, the
model's positions and the cache, and every surface reports that one number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import psutil
import torch

from constants import ServiceConstants
from opt_serving.capacity.planner import kv_bytes_per_token_per_gpu, kv_cache_tokens
from opt_serving.config import DTYPES, OPTConfig

from .naming import cli_name


class TooSmall(ValueError):
    """The KV cache cannot be made as asked: the message names the flag to change."""


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
        if c.kv_block_size > tokens:
            raise TooSmall(f"--kv-block-size {c.kv_block_size} is larger than the whole KV "
                           f"cache ({tokens} tokens per rank): pass a --kv-block-size of at "
                           f"most {tokens} (16 is the default)")
        blocks = tokens // c.kv_block_size
        if blocks * c.kv_block_size < 8:
            raise TooSmall(f"the KV cache would hold only {tokens} tokens: not enough for "
                           "a sequence. Free GPU memory, use more model-parallel ranks, or "
                           "pass --kv-tokens")
        return cls(blocks, c.kv_block_size)


CPU_SEQUENCES = 8


def dtype_bytes(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def cache_bytes(cfg: OPTConfig, tokens: int, world_size: int, dtype: str) -> int:
    """Bytes one rank's KV cache of ``tokens`` positions takes (``opt-capacity``'s figure
    per token and GPU)."""
    return tokens * kv_bytes_per_token_per_gpu(cfg, world_size, dtype_bytes(dtype))


def free_bytes(device: torch.device) -> int:
    """What a new allocation may take: free GPU memory, or the RAM available on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(cfg: OPTConfig, tokens: int, world_size: int, dtype: str,
               device: torch.device, naming=cli_name) -> None:
    """Refuse a cache the device cannot hold, before allocating it. ``naming(option,
    value)`` spells an option for the caller (a flag, or a keyword of ``LLM``)."""
    need, free = cache_bytes(cfg, tokens, world_size, dtype), free_bytes(device)
    if need > free:
        fits = tokens * free // max(1, need)
        raise TooSmall(f"{naming('kv_tokens', tokens)}: a KV cache of {tokens:,} tokens needs "
                       f"{need:,} bytes per rank ({dtype}), and the {device.type} has {free:,} "
                       f"bytes free; pass {naming('kv_tokens', fits)} or less")


def graph_bytes(cfg: OPTConfig, rows: int, world_size: int, dtype: str) -> int:
    """What CUDA graphs of up to ``rows`` decode rows hold in their pool (the largest bucket's
    activations: logits, the fc1 output, a few hidden states, with room to spare), set aside
    before the KV cache is sized from free memory. The start-up log says what they took."""
    per_row = cfg.vocab_size + 4 * cfg.ffn_dim // world_size + 8 * cfg.embed_dim
    return 2 * rows * per_row * dtype_bytes(dtype) + 64 * 2**20


def kv_tokens(cfg: OPTConfig, c: ServiceConstants, world_size: int, dtype: str, model,
              device: torch.device, requested: int | None = None, reserve: int = 0) -> int:
    """KV-cache positions this rank allocates: ``requested`` (--kv-tokens), else from free
    memory less ``reserve`` bytes (the CUDA graphs')."""
    if requested:
        return requested
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes = dtype_bytes(dtype)
    if device.type != "cuda":
        # CPU: a quarter of the available RAM, at most 8 full-length sequences (metaseq's
        # MAX_BATCH_TOKENS alone would hold one long sequence: no batching at all).
        ram = psutil.virtual_memory().available // 4 // max(1, world_size)
        fit = kv_cache_tokens(cfg, world_size, ram + weights, nbytes, c.max_batch_tokens,
                              weight_bytes=weights)
        return max(c.max_batch_tokens, min(fit, CPU_SEQUENCES * c.max_seq_len))
    free, _ = torch.cuda.mem_get_info(device)
    # One source of truth with opt-capacity: free memory as if the weights were not loaded.
    return kv_cache_tokens(cfg, world_size, free + torch.cuda.memory_allocated(device) - reserve,
                           nbytes, c.max_batch_tokens, weight_bytes=weights)


def effective_limits(c: ServiceConstants, cfg: OPTConfig, layout: CacheLayout,
                     seq_len_given: bool, naming=cli_name) -> ServiceConstants:
    """``c`` with ``max_seq_len`` the positions a sequence really gets: the smallest of
    --max-seq-len, the model's positions and the cache. A --max-seq-len given explicitly that
    the model or the cache cannot hold is refused (TooSmall), as vLLM does; the default is cut
    to the model's positions quietly. ``naming(option, value)`` spells an option."""
    name, limit = naming, c.max_seq_len
    if limit > cfg.max_positions:
        if seq_len_given:
            raise TooSmall(f"{name('max_seq_len', limit)} is more than {cfg.name} has "
                           f"positions for ({cfg.max_positions}): pass "
                           f"{name('max_seq_len', cfg.max_positions)} or less")
        limit = cfg.max_positions
    if limit > layout.tokens:
        raise TooSmall(f"{name('max_seq_len', limit)}{'' if seq_len_given else ' (default)'} "
                       f"does not fit in the KV cache of {layout.tokens} tokens per rank "
                       f"({name('kv_tokens')}): pass {name('max_seq_len', layout.tokens)} "
                       f"or less, or a larger {name('kv_tokens')}")
    return dataclasses.replace(c, max_seq_len=limit,
                               default_max_tokens=min(c.default_max_tokens, max(1, limit - 2)))
