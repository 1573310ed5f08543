"""What a set of checkpoint files holds, and a per-rank view of its tensors by metaseq name.

Three layouts reach us: a consolidated file (fused ``qkv_proj`` or separate
``k/v/q_proj``), model-parallel parts ``*-model_part-{r}.pt``, and raw FSDP shards
``*-model_part-{r}-shard{d}.pt`` whose parameters are flattened. ``open_parts`` turns any of
them into ``Part`` objects: ``part.tensors[name]`` has ``shape``, ``dtype`` and ``read()``.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DTYPES, OPTConfig
from . import torch_file
from .errors import CheckpointError
from .lazy_tensor import LazyTensor

PART_RE = re.compile(r"^(?P<stem>.*?)-model_part-(?P<part>\d+)(?:-shard(?P<shard>\d+))?\.pt$")


def _sorted_parts(files: list[str]) -> list[list[str]]:
    """Group files into parts[r] = [shard 0, shard 1, ...]; check nothing is missing."""
    if len(files) == 1 and not PART_RE.match(os.path.basename(files[0])):
        return [files]
    groups: dict[str, dict[int, dict[int, str]]] = {}
    for f in files:
        m = PART_RE.match(os.path.basename(f))
        if not m:
            raise CheckpointError(f, "does not look like a model-parallel part "
                                  "(*-model_part-N.pt) but was given with others",
                                  "pass one consolidated file, or only the parts of one "
                                  "checkpoint")
        groups.setdefault(os.path.join(os.path.dirname(f), m["stem"]), {}).setdefault(
            int(m["part"]), {})[int(m["shard"] or 0)] = f
    if len(groups) > 1:
        raise CheckpointError(", ".join(sorted(groups)), "are parts of different checkpoints",
                              "pass the parts of one checkpoint only")
    (stem, parts), = groups.items()
    if sorted(parts) != list(range(len(parts))):
        raise CheckpointError(stem, f"has parts {sorted(parts)}: some model_part files are "
                              "missing", "copy every part (0 .. N-1) next to the others")
    out = []
    for r in range(len(parts)):
        shards = parts[r]
        if sorted(shards) != list(range(len(shards))):
            raise CheckpointError(stem, f"part {r} has shards {sorted(shards)}: some are missing",
                                  "copy every -shard file of every part")
        out.append([shards[d] for d in range(len(shards))])
    return out


def discover(inputs: list[str]) -> list[list[str]]:
    """Files, globs, folders, or metaseq's virtual ``<folder>/reshard.pt`` -> parts[r][shard]."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).glob("*.pt") if PART_RE.match(p.name))
            if not found:
                found = sorted(str(p) for p in Path(item).glob("*.pt"))
            if not found:
                raise CheckpointError(item, "holds no checkpoint (*.pt) files",
                                      "point at the folder that holds the .pt files")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise CheckpointError(item, "matches no file", "check the pattern")
            files += found
        else:
            stem = item[:-3] if item.endswith(".pt") else item
            virtual = sorted(glob.glob(glob.escape(stem) + "-model_part-*.pt"))
            if not virtual:
                raise CheckpointError(item, "does not exist", "check the path")
            files += virtual
    return _sorted_parts(sorted(set(files), key=files.index))


@dataclass(frozen=True)
class FlatSlice:
    """One parameter inside an FSDP flat parameter that is split over DP shard files."""

    pieces: tuple[tuple[LazyTensor, int], ...]  # (shard's flat tensor, its unpadded numel)
    start: int  # offset of this parameter in the unpadded concatenation
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def read(self) -> torch.Tensor:
        want_lo, want_hi = self.start, self.start + math.prod(self.shape)
        out, base = [], 0
        for flat, valid in self.pieces:
            lo, hi = max(want_lo, base), min(want_hi, base + valid)
            if lo < hi:
                out.append(flat.read(rows=(lo - base, hi - base)))
            base += valid
        return torch.cat(out).view(self.shape)

    def mmap(self) -> torch.Tensor:
        """Like ``read``, from memory-mapped shards: a view when one shard holds it all."""
        want_lo, want_hi = self.start, self.start + math.prod(self.shape)
        out, base = [], 0
        for flat, valid in self.pieces:
            lo, hi = max(want_lo, base), min(want_hi, base + valid)
            if lo < hi:
                out.append(flat.mmap()[lo - base:hi - base])
            base += valid
        return (out[0] if len(out) == 1 else torch.cat(out)).view(self.shape)


@dataclass
class Part:
    """Model-parallel rank ``rank``: its tensors by metaseq name and its checkpoint dict."""

    rank: int
    files: list[str]
    ckpt: dict
    tensors: dict = field(default_factory=dict)  # name -> LazyTensor | FlatSlice
    flattened: bool = False

    @property
    def kind(self) -> str:
        if self.flattened:
            return "flattened FSDP shards"
        if any(n.endswith("self_attn.q_proj.weight") for n in self.tensors):
            return "separate q,k,v"
        return "fused qkv"


def _checkpoint_dict(path: str) -> dict:
    obj = torch_file.load(path)
    if not isinstance(obj, dict) or "model" not in obj or not isinstance(obj["model"], dict):
        raise CheckpointError(path, "is a torch file but not a metaseq checkpoint (no 'model' "
                              "state dict)", "pass a metaseq checkpoint (consolidated.pt, "
                              "*-model_part-N.pt or FSDP shards)")
    return obj


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _param_metadata(path: str, ckpt: dict) -> list[dict]:
    """shard_metadata["param_metadata"], checked: a list of {"fsdp_path": str, "params":
    {flat name: {"names": [str], "shapes": [[int]], "numels": [int], "padding": int}}}."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(path, f"has corrupt FSDP shard_metadata: {what}",
                               "use the original FSDP shard files")
    meta = ckpt.get("shard_metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("param_metadata"), list):
        raise CheckpointError(path, "has flattened parameters but no shard_metadata with a "
                              "param_metadata list", "this file cannot be un-flattened; use "
                              "the original FSDP shards")
    for i, entry in enumerate(meta["param_metadata"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
            raise bad(f"param_metadata[{i}] has no 'params' dict")
        if not isinstance(entry.get("fsdp_path", ""), str):
            raise bad(f"param_metadata[{i}].fsdp_path is not a string")
        for flat, info in entry["params"].items():
            where = f"param_metadata[{i}].params[{flat!r}]"
            if not isinstance(info, dict) or not all(k in info for k in
                                                      ("names", "shapes", "numels", "padding")):
                raise bad(f"{where} lacks names, shapes, numels or padding")
            names, shapes, numels = info["names"], info["shapes"], info["numels"]
            if not (isinstance(names, list) and isinstance(shapes, list)
                    and isinstance(numels, list)) or not len(names) == len(shapes) == len(numels):
                raise bad(f"{where}: names, shapes and numels are not lists of one length")
            for name, shape, numel in zip(names, shapes, numels):
                if not isinstance(name, str) or not isinstance(shape, (list, tuple)) or \
                        not all(_is_count(x) for x in shape) or not _is_count(numel) or \
                        math.prod(shape) != numel:
                    raise bad(f"{where}: {name!r} has shape {shape!r} and numel {numel!r}")
            if not _is_count(info["padding"]):
                raise bad(f"{where}: padding {info['padding']!r} is not a count")
    names = meta.get("buffer_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("buffer_names is not a list of names")
    return meta["param_metadata"]


def _unflatten(files: list[str], dicts: list[dict]) -> dict:
    """FSDP shards of one part -> name -> FlatSlice. Each shard's ``model`` holds flat
    parameters ``<fsdp_path>.flat_param_0``: the part's parameters (names, shapes and numels in
    ``shard_metadata``) concatenated, padded at the end, and cut into equal shard slices."""
    metas = [_param_metadata(f, d) for f, d in zip(files, dicts)]
    out: dict = {}
    for i, entry in enumerate(metas[0]):
        path = entry.get("fsdp_path", "")
        for flat_name, info in entry["params"].items():
            key = f"{path}.{flat_name}" if path else flat_name
            pieces = []
            for f, d, meta in zip(files, dicts, metas):
                flat = d["model"].get(key)
                if not isinstance(flat, LazyTensor):
                    raise CheckpointError(f, f"lacks the flat parameter {key}",
                                          "the shard is incomplete: copy it again")
                if i >= len(meta) or flat_name not in meta[i]["params"]:
                    raise CheckpointError(f, f"has shard_metadata that does not match shard "
                                          f"0's (no entry {i} for {key})", "use the original "
                                          "FSDP shards of one checkpoint")
                pad = meta[i]["params"][flat_name]["padding"]
                if pad > flat.numel:
                    raise CheckpointError(f, f"says {key} has {pad} padding elements but it "
                                          f"holds {flat.numel}", "use the original FSDP shards")
                pieces.append((flat, flat.numel - pad))
            start = 0
            for name, shape, numel in zip(info["names"], info["shapes"], info["numels"]):
                full = f"{path}.{name}" if path else name
                out[_strip(full)] = FlatSlice(tuple(pieces), start, tuple(shape), pieces[0][0].dtype)
                start += numel
            if start > sum(v for _, v in pieces):
                raise CheckpointError(files[0], f"flat parameter {key} is shorter than its "
                                      "metadata says", "a shard is truncated: copy it again")
    for name in dicts[0]["shard_metadata"].get("buffer_names", []):
        if isinstance(dicts[0]["model"].get(name), LazyTensor):
            out[_strip(name)] = dicts[0]["model"][name]
    return out


def open_part(rank: int, files: list[str]) -> Part:
    dicts = [_checkpoint_dict(f) for f in files]
    model = dicts[0]["model"]
    flattened = any(k.endswith("flat_param_0") for k in model)
    if flattened:
        tensors = _unflatten(files, dicts)
    else:
        if len(files) > 1:
            raise CheckpointError(files[1], "is a -shard file whose parameters are not flattened",
                                  "pass the consolidated parts instead of FSDP shards")
        tensors = {_strip(k): v for k, v in model.items() if isinstance(v, LazyTensor)}
    return Part(rank, files, dicts[0], tensors, flattened)


def open_parts(inputs: list[str]) -> list[Part]:
    return [open_part(r, files) for r, files in enumerate(discover(inputs))]


def model_config(part: Part) -> OPTConfig:
    ckpt = part.ckpt
    cfg = ckpt.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if model_cfg is None:
        model_cfg = ckpt.get("args")
    if model_cfg is None:
        raise CheckpointError(part.files[0], "has no model configuration (cfg['model'] or args)",
                              "use the checkpoint's original files, which carry their cfg")
    try:
        return OPTConfig.from_metaseq(model_cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(part.files[0], f"has an unusable model configuration ({e})",
                              "use the checkpoint's original files") from None


def read_config(path: str) -> tuple[OPTConfig, int]:
    """The model config and model-parallel degree of a file or folder; no weights are read."""
    parts = discover([path])
    return model_config(open_part(0, parts[0])), len(parts)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(
        dtype, str(dtype).replace("torch.", ""))
