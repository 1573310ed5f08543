"""The unsharded (degree 1, fused [K; V; Q]) view of any set of input parts.

``GlobalView.read(name)`` returns one full tensor, merged from the N input parts with the
split rules and checked (shapes, replicated copies identical). The resharder then cuts it for
the M output ranks, so at most one full tensor and one piece of it are in memory at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import OPTConfig
from ..split_rules import Split, fuse_kvq, merge, rule_for, sharded_shape
from .errors import CheckpointError
from .formats import Part, model_config

_QKV = re.compile(r"(decoder\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)\Z")


@dataclass(frozen=True)
class QKVLayout:
    """How a fused qkv tensor of a single (consolidated) file is ordered.

    ``chunks`` = 1: metaseq's global [K; V; Q]. ``chunks`` = k > 1: k model-parallel parts
    naively concatenated along dim 0, i.e. [K_0; V_0; Q_0; K_1; ...].
    """

    chunks: int = 1

    @classmethod
    def parse(cls, text: str) -> "QKVLayout":
        if text in ("global", "kvq"):
            return cls(1)
        m = re.fullmatch(r"concat:(\d+)", text)
        if not m or int(m[1]) < 1:
            raise ValueError(f"--input-qkv {text!r}: use 'global' or 'concat:N'")
        return cls(int(m[1]))


def saved_layout(part: Part) -> QKVLayout | None:
    """The layout recorded by this tool (extra_state), or implied by a degree-1 cfg."""
    extra = part.ckpt.get("extra_state")
    if isinstance(extra, dict) and isinstance(extra.get("reshard"), dict):
        if extra["reshard"].get("qkv_layout") == "kvq":
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
        self._check()

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].tensors["decoder.embed_tokens.weight"].dtype

    def names(self) -> list[str]:
        return list(self.cfg.param_shapes())

    def _input_names(self, name: str) -> list[str]:
        m = _QKV.match(name)
        if m and self.separate:
            return [f"{m[1]}{x}_proj.{m[2]}" for x in "kvq"]
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

    def _merged(self, name: str) -> torch.Tensor:
        split = rule_for(name)
        pieces = [p.tensors[name].read() for p in self.parts]
        if split is Split.REPLICATED:
            for p, t in zip(self.parts[1:], pieces[1:]):
                if not torch.equal(t, pieces[0]):
                    raise CheckpointError(p.files[0], f"disagrees with part 0 on the replicated "
                                          f"tensor {name}", "the parts come from different "
                                          "checkpoints or one is corrupt: use matching parts")
            return pieces[0]
        return merge(split, pieces)

    def read(self, name: str) -> torch.Tensor:
        """Full unsharded tensor ``name`` (fused qkv in global [K; V; Q] order)."""
        inputs = self._input_names(name)
        if len(inputs) == 3:
            return fuse_kvq(*(self._merged(n) for n in inputs))
        full = self._merged(name)
        if rule_for(name) is Split.QKV and self.n == 1 and self.qkv_layout.chunks > 1:
            full = merge(Split.QKV, list(full.chunk(self.qkv_layout.chunks, dim=0)))
        if name == "decoder.embed_tokens.weight":
            self._check_output_projection(full)
        return full

    def _check_output_projection(self, embed: torch.Tensor) -> None:
        if "decoder.output_projection.weight" not in self.parts[0].tensors:
            return
        proj = self._merged("decoder.output_projection.weight")
        if not torch.equal(proj, embed):
            raise CheckpointError(self.parts[0].files[0], "holds an output_projection that "
                                  "differs from embed_tokens (OPT ties them; metaseq would "
                                  "silently overwrite the embedding with it)", "this is not a "
                                  "standard OPT checkpoint: check where it came from")
