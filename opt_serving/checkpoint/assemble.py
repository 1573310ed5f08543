"""The unsharded (degree 1, fused [K; V; Q]) view of any set of input parts.

``GlobalView.piece(name, r, M)`` is output rank r's piece of tensor ``name`` cut straight from
the N memory-mapped input pieces: a view when it lies inside one of them, else one
concatenation, so a byte is copied at most once on its way to the writer and no full tensor
is ever assembled. ``read(name)`` is the full tensor (``piece(name, 0, 1)``). Inputs are
checked on the way (shapes, replicated copies identical).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import OPTConfig
from ..split_rules import (FUSED_ORDER, Split, rule_for, separate_names, sharded_shape,
                           split_dim)
from .errors import CheckpointError
from .formats import Part, model_config

# alloc(shape, dtype) -> a tensor to write a piece into (the resharder reuses its buffers).
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class QKVLayout:
    """How a fused qkv tensor of a single (consolidated) file is ordered.

    ``chunks`` = 1: metaseq's global [K; V; Q]. ``chunks`` = k > 1: k model-parallel parts
    naively concatenated along dim 0, i.e. [K_0; V_0; Q_0; K_1; ...].
    """

    chunks: int = 1

    @classmethod
    def parse(cls, text: str) -> "QKVLayout":
        if text in ("global", FUSED_ORDER):
            return cls(1)
        m = re.fullmatch(r"concat:(\d+)", text)
        if not m or int(m[1]) < 1:
            raise ValueError(f"--input-qkv {text!r}: use 'global' or 'concat:N'")
        return cls(int(m[1]))


def saved_layout(part: Part) -> QKVLayout | None:
    """The layout recorded by this tool (extra_state), or implied by a degree-1 cfg."""
    extra = part.ckpt.get("extra_state")
    if isinstance(extra, dict) and isinstance(extra.get("reshard"), dict):
        if extra["reshard"].get("qkv_layout") == FUSED_ORDER:
            return QKVLayout(1)
    cfg = part.ckpt.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else part.ckpt.get("args")
    mp = getattr(model_cfg, "model_parallel_size", None)
    if mp is None and isinstance(model_cfg, dict):
        mp = model_cfg.get("model_parallel_size")
    return QKVLayout(1) if mp in (None, 1) else None


class GlobalView:
    def __init__(self, parts: list[Part], qkv_layout: QKVLayout | None = None):
        self.parts = parts
        self.n = len(parts)
        self.cfg: OPTConfig = model_config(parts[0])
        self.separate = parts[0].kind == "separate q,k,v"
        self.qkv_layout = QKVLayout(1)
        if self.n == 1 and not self.separate:
            layout = qkv_layout or saved_layout(parts[0])
            if layout is None:
                raise CheckpointError(
                    parts[0].files[0], "is a single file with fused qkv_proj tensors, but its "
                    "cfg says it was trained at model-parallel degree > 1, so the order of the "
                    "fused rows cannot be told apart (metaseq's global [K;V;Q], or parts "
                    "concatenated as [K0;V0;Q0;K1;...])", "pass --input-qkv global or "
                    "--input-qkv concat:N (N = the original degree), then check the result with "
                    "`reshard verify` and a few generations")
            self.qkv_layout = layout
        self._checked: set[str] = set()  # replicated tensors already compared across parts
        self._check()

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].tensors["decoder.embed_tokens.weight"].dtype

    def names(self) -> list[str]:
        return list(self.cfg.param_shapes())

    def _input_names(self, name: str) -> list[str]:
        if self.separate and rule_for(name) is Split.QKV:
            return separate_names(name)
        return [name]

    def _check(self) -> None:
        shapes = self.cfg.param_shapes()
        expected: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            inputs = self._input_names(name)
            for inp in inputs:
                full = shape if len(inputs) == 1 else (shape[0] // 3, *shape[1:])
                expected[inp] = sharded_shape(rule_for(inp), full, self.n)
        for part in self.parts:
            have = set(part.tensors)
            missing = [k for k in expected if k not in have]
            where = part.files[0]
            if missing:
                raise CheckpointError(where, f"lacks {len(missing)} expected tensors (e.g. "
                                      f"{', '.join(missing[:3])})", "the file is incomplete or "
                                      "its cfg does not match its weights: use the original files")
            extra = sorted(have - set(expected) - {"decoder.output_projection.weight"})
            if extra:
                raise CheckpointError(where, f"holds tensors this tool does not know (e.g. "
                                      f"{', '.join(extra[:3])})", "this is not an OPT "
                                      "checkpoint of a supported architecture (pre-LN OPT, BB3)")
            for k, want in expected.items():
                got = tuple(part.tensors[k].shape)
                if got != want:
                    raise CheckpointError(where, f"has {k} of shape {list(got)}, but the cfg "
                                          f"({self.cfg.name}) at degree {self.n} needs "
                                          f"{list(want)}", "the parts do not belong together, "
                                          "or the cfg is wrong: use the original files")

    def _pieces(self, name: str) -> list[torch.Tensor]:
        """The N input ranks' tensors, memory-mapped: nothing is read until it is touched."""
        return [p.tensors[name].mmap() for p in self.parts]

    def _replicated(self, name: str) -> torch.Tensor:
        pieces = self._pieces(name)
        if name not in self._checked:
            for p, t in zip(self.parts[1:], pieces[1:]):
                if not torch.equal(t, pieces[0]):
                    raise CheckpointError(p.files[0], f"disagrees with part 0 on the replicated "
                                          f"tensor {name}", "the parts come from different "
                                          "checkpoints or one is corrupt: use matching parts")
            self._checked.add(name)
        return pieces[0]

    def _thirds(self, name: str) -> list[list[torch.Tensor]]:
        """K, V and Q of a qkv tensor, each as consecutive row blocks (one per input rank)."""
        if self.separate:
            return [self._pieces(sub) for sub in separate_names(name)]
        pieces = self._pieces(name)
        if self.n == 1 and self.qkv_layout.chunks > 1:  # [K_0; V_0; Q_0; K_1; ...] in one file
            pieces = list(pieces[0].chunk(self.qkv_layout.chunks, dim=0))
        per_rank = [p.chunk(3, dim=0) for p in pieces]  # rank j: (K_j, V_j, Q_j)
        return [[kvq[t] for kvq in per_rank] for t in range(3)]

    def piece(self, name: str, rank: int = 0, world: int = 1, third: int | None = None,
              alloc: Alloc | None = None) -> torch.Tensor:
        """Rank ``rank`` of ``world``'s piece of ``name`` (fused qkv: [K_r; V_r; Q_r], or only
        third ``third`` of it: 0 = K, 1 = V, 2 = Q). Either a view of the mapped input (do
        not modify it) or a concatenation into ``alloc(shape, dtype)`` (fresh memory if None).
        """
        split = rule_for(name)
        if split is Split.REPLICATED:
            return self._replicated(name)
        if split is Split.QKV:
            thirds = self._thirds(name)
            wanted = thirds if third is None else [thirds[third]]
            return _join([b for blocks in wanted for b in _cut(blocks, 0, rank, world)], 0,
                         alloc)
        dim = split_dim(split)
        out = _join(_cut(self._pieces(name), dim, rank, world), dim, alloc)
        if name == "decoder.embed_tokens.weight":
            self._check_output_projection(out, rank, world)
        return out

    def read(self, name: str) -> torch.Tensor:
        """Full unsharded tensor ``name`` (fused qkv in global [K; V; Q] order)."""
        return self.piece(name)

    def _check_output_projection(self, embed: torch.Tensor, rank: int, world: int) -> None:
        name = "decoder.output_projection.weight"
        if name not in self.parts[0].tensors:
            return
        proj = _join(_cut(self._pieces(name), 0, rank, world), 0)
        if not torch.equal(proj, embed):
            raise CheckpointError(self.parts[0].files[0], "holds an output_projection that "
                                  "differs from embed_tokens (OPT ties them; metaseq would "
                                  "silently overwrite the embedding with it)", "this is not a "
                                  "standard OPT checkpoint: check where it came from")


def _cut(blocks: list[torch.Tensor], dim: int, rank: int, world: int) -> list[torch.Tensor]:
    """Views of ``blocks`` (consecutive along ``dim``) covering rank ``rank``'s equal share."""
    total = sum(b.shape[dim] for b in blocks)
    if total % world:
        raise ValueError(f"dimension {dim} of size {total} does not split {world} ways")
    start, stop = rank * total // world, (rank + 1) * total // world
    out, base = [], 0
    for b in blocks:
        lo, hi = max(start, base), min(stop, base + b.shape[dim])
        if lo < hi:
            out.append(b.narrow(dim, lo - base, hi - lo))
        base += b.shape[dim]
    return out


def _join(blocks: list[torch.Tensor], dim: int, alloc: Alloc | None = None) -> torch.Tensor:
    if len(blocks) == 1:
        return blocks[0]
    shape = list(blocks[0].shape)
    shape[dim] = sum(b.shape[dim] for b in blocks)
    out = alloc(tuple(shape), blocks[0].dtype) if alloc else None
    return torch.cat(blocks, dim=dim, out=out)
