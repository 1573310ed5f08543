"""Load a checkpoint into an ``OPTModel`` for one tensor-parallel rank.

The model is built on the meta device, sharded by the TP pass (shapes only), and then given
this rank's tensors with a strict ``load_state_dict(assign=True)``: memory-mapped when the
checkpoint already has one part per rank, otherwise cut from the full tensors on the fly.
"""

from __future__ import annotations

import torch

from .. import tensor_parallel
from ..config import OPTConfig
from ..model import SINGLE, Comm, OPTModel
from ..split_rules import fuse_kvq, rule_for, shard
from .assemble import GlobalView, QKVLayout
from .formats import Part, model_config, open_parts


def _own_part_state(part: Part) -> dict[str, torch.Tensor]:
    """This rank's tensors from a part already at the serving degree (zero-copy mmap)."""
    state = {}
    for name in model_config(part).param_shapes():
        if name in part.tensors:
            t = part.tensors[name]
            state[name] = t.mmap() if hasattr(t, "mmap") else t.read()
        else:  # separate k/v/q in a consolidated file
            state[name] = fuse_kvq(*(part.tensors[name.replace("qkv_proj", f"{x}_proj")].read()
                                     for x in "kvq"))
    return state


def load_model(checkpoint: str | list[str], *, comm: Comm = SINGLE,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               input_qkv: str | None = None) -> tuple[OPTModel, OPTConfig]:
    """Build, shard for ``comm.rank`` of ``comm.size`` and load. Returns (model, config)."""
    inputs = checkpoint if isinstance(checkpoint, list) else [checkpoint]
    parts = open_parts(inputs)
    cfg = model_config(parts[0])
    cfg.check_mp(comm.size)
    with torch.device("meta"):
        model = OPTModel(cfg)
    tensor_parallel.apply(model, comm)
    # Validates every part (keys, shapes, the fused-qkv order) before any weight is read.
    view = GlobalView(parts, QKVLayout.parse(input_qkv) if input_qkv else None)
    if len(parts) == comm.size and not parts[comm.rank].flattened and view.qkv_layout.chunks == 1:
        state = _own_part_state(parts[comm.rank])
    else:
        state = {n: shard(rule_for(n), view.read(n), comm.rank, comm.size).contiguous()
                 for n in view.names()}
    target = dtype or state["decoder.embed_tokens.weight"].dtype
    state = {n: t.to(device=device, dtype=torch.float32 if n == "decoder.version" else target)
             for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg
