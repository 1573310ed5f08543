"""Tensor parallelism as a pass over an already-built ``OPTModel``.

Which tensor splits along which dimension comes from ``split_rules`` (the resharder's table).
The pass replaces each parameter by this rank's piece and installs the collectives: the
row-parallel outputs (out_proj, fc2) are all-reduced before their bias is added, the
vocab-parallel embedding is all-reduced, and logits are all-gathered over the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .model import Comm, OPTModel
from .split_rules import rule_for, shard, sharded_shape


class DistComm(Comm):
    """Collectives over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def apply(model: OPTModel, comm: Comm) -> OPTModel:
    """Shard ``model`` in place for ``comm.rank`` of ``comm.size`` and wire its collectives.

    On the meta device only shapes change (a rank then loads its own part); on a real device
    each parameter is replaced by a contiguous copy of its slice.
    """
    world, rank = comm.size, comm.rank
    cfg = model.cfg
    if world == 1:
        return model
    cfg.check_mp(world)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        split = rule_for(name)
        if tensor.is_meta:
            new = torch.empty(sharded_shape(split, tuple(tensor.shape), world),
                              dtype=tensor.dtype, device="meta")
        else:
            new = shard(split, tensor.detach(), rank, world).contiguous().clone()
        _replace(model, name, new)
    dec = model.decoder
    dec.comm = comm
    dec.vocab_start = rank * cfg.vocab_size // world
    for layer in dec.layers:
        layer.self_attn.comm = comm
        layer.self_attn.num_heads = cfg.num_heads // world
    return model


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value
