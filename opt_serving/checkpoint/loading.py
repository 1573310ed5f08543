"""Load a checkpoint into an ``OPTModel`` for one tensor-parallel rank.

The model is built on the meta device, sharded by the TP pass (shapes only), and then given
this rank's tensors with a strict ``load_state_dict(assign=True)``: read through a memory map
when the checkpoint already has one part per rank (and on a CPU copied out of it, tensor by
tensor), otherwise cut from the inputs piece by piece.
"""

from __future__ import annotations

import torch

from .. import tensor_parallel
from ..config import OPTConfig
from ..model import SINGLE, Comm, OPTModel
from ..split_rules import stored_dtype
from .assemble import GlobalView, QKVLayout
from .formats import model_config, open_parts


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
    own = parts[comm.rank] if len(parts) == comm.size else None
    mapped = own is not None and own.kind == "fused qkv" and view.qkv_layout.chunks == 1
    if mapped:
        # One part per rank, stored as the model wants it: read through a memory map.
        state = {n: own.tensors[n].mmap() for n in view.names()}
    else:  # other degree, FSDP shards, separate q/k/v: cut this rank's pieces on the fly
        state = {n: view.piece(n, comm.rank, comm.size).contiguous() for n in view.names()}
    target = dtype or state["decoder.embed_tokens.weight"].dtype
    # On a CPU, weights left in the map decode at 27 tokens/s, copied into the process's own
    # memory (huge pages) at 41 (opt-125m fp32, a checkpoint not freshly written, measured).
    copy = mapped and torch.device(device).type == "cpu"
    state = {n: t.to(device=device, dtype=stored_dtype(n, target), copy=copy)
             for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg
