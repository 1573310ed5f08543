"""The one table of model-parallel split rules, shared by ``reshard`` and the TP pass.

metaseq's Megatron layout for rank r of M:

  vocab       embed_tokens / output_projection: dim 0, contiguous vocabulary ranges
  qkv         fused qkv_proj: dim 0 *per third*, rank r holds [K_r; V_r; Q_r]
  column      fc1 weight and bias: dim 0
  row         out_proj / fc2 weight: dim 1 (their biases are replicated, added once)
  replicated  positions, layer norms, row-parallel biases, decoder.version
"""

from __future__ import annotations

import enum
import re

import torch


class Split(enum.Enum):
    VOCAB = "vocab"
    QKV = "qkv"
    COLUMN = "column"
    ROW = "row"
    REPLICATED = "replicated"


_LAYER = r"decoder\.layers\.\d+\."
RULES: tuple[tuple[re.Pattern, Split], ...] = tuple((re.compile(p + r"\Z"), s) for p, s in (
    (r"decoder\.embed_tokens\.weight", Split.VOCAB),
    (r"decoder\.output_projection\.weight", Split.VOCAB),
    (r"decoder\.embed_positions\.weight", Split.REPLICATED),
    (r"decoder\.version", Split.REPLICATED),
    (r"decoder\.layer_norm\.(weight|bias)", Split.REPLICATED),
    (_LAYER + r"self_attn\.qkv_proj\.(weight|bias)", Split.QKV),
    # Separate projections (consolidated files): heads are contiguous rows, like fc1.
    (_LAYER + r"self_attn\.[kvq]_proj\.(weight|bias)", Split.COLUMN),
    (_LAYER + r"self_attn\.out_proj\.weight", Split.ROW),
    (_LAYER + r"self_attn\.out_proj\.bias", Split.REPLICATED),
    (_LAYER + r"fc1\.(weight|bias)", Split.COLUMN),
    (_LAYER + r"fc2\.weight", Split.ROW),
    (_LAYER + r"fc2\.bias", Split.REPLICATED),
    (_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.(weight|bias)", Split.REPLICATED),
    (_LAYER + r"self_attn\.version", Split.REPLICATED),
))


def rule_for(name: str) -> Split:
    """The split of a parameter; an unknown name is an error, never silently dropped."""
    for pattern, split in RULES:
        if pattern.match(name):
            return split
    raise KeyError(f"no split rule for tensor {name!r}")


def split_dim(split: Split) -> int | None:
    return {Split.ROW: 1, Split.REPLICATED: None}.get(split, 0)


def shard(split: Split, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s piece of the unsharded tensor ``full`` (a view where possible)."""
    if split is Split.REPLICATED or world == 1:
        return full
    if split is Split.QKV:
        # [K; V; Q] -> [K_r; V_r; Q_r]
        return torch.cat([third.chunk(world, dim=0)[rank] for third in full.chunk(3, dim=0)])
    dim = split_dim(split)
    if full.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split {world} ways")
    return full.chunk(world, dim=dim)[rank]


def sharded_shape(split: Split, shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    dim = split_dim(split)
    if dim is None or world == 1:
        return tuple(shape)
    out = list(shape)
    out[dim] //= world
    return tuple(out)


def unfuse_kvq(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global fused [K; V; Q] -> (k, v, q)."""
    k, v, q = qkv.chunk(3, dim=0)
    return k, v, q


# -- metaseq's layout conventions, in one place ----------------------------------------------

FUSED_ORDER = "kvq"  # fused qkv_proj rows are [K; V; Q] (per rank in model-parallel parts)
BUFFERS = frozenset({"decoder.version"})  # one-element fp32 buffers, not parameters


def separate_names(fused: str) -> list[str]:
    """``...self_attn.qkv_proj.weight`` -> the k_proj, v_proj, q_proj names, in fused order."""
    return [fused.replace("qkv_proj", f"{x}_proj") for x in FUSED_ORDER]


def third_shape(fused_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one of k, v, q in a fused tensor of ``fused_shape``."""
    return (fused_shape[0] // 3, *fused_shape[1:])


def is_buffer(name: str) -> bool:
    return name in BUFFERS


def stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written and loaded in: buffers stay fp32 whatever ``dtype``."""
    return torch.float32 if name in BUFFERS else dtype
