"""Random checkpoints in every layout real users hold: for the demo, the tests and benchmarks.

Written the way metaseq writes them (``torch.save`` of a full checkpoint dict), so reading
them exercises the same paths as a downloaded BB3 / OPT checkpoint.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import torch

from ..config import OPTConfig
from ..split_rules import Split, is_buffer, rule_for, separate_names, shard, unfuse_kvq
from ..checkpoint.metaseq import part_metadata


def random_state(cfg: OPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 std: float = 0.02) -> dict[str, torch.Tensor]:
    """A full (degree 1, fused [K; V; Q]) state dict with non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    for name, shape in cfg.param_shapes().items():
        if is_buffer(name):
            state[name] = torch.tensor([3.0])
        elif "layer_norm" in name and name.endswith("weight"):
            state[name] = (1.0 + std * torch.randn(shape, generator=gen)).to(dtype)
        else:
            state[name] = (std * torch.randn(shape, generator=gen)).to(dtype)
    return state


def separate_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused -> separate k/v/q projections (the layout of "consolidated" exports)."""
    out = collections.OrderedDict()
    for name, t in state.items():
        if rule_for(name) is Split.QKV:
            for sub, piece in zip(separate_names(name), unfuse_kvq(t)):
                out[sub] = piece.clone()
        else:
            out[name] = t
    return out


def _checkpoint(cfg: OPTConfig, model: dict, mp: int, **extra) -> dict:
    meta = part_metadata(None, cfg, mp, origin="synthetic")
    meta["extra_state"].pop("reshard")
    return {"model": model, **meta, "last_optimizer_state": {"state": {}}, **extra}


def write_consolidated(path: str | Path, cfg: OPTConfig, state: dict, *,
                       separate: bool = True, trained_mp: int = 1) -> Path:
    """One file, as BB3-30B's consolidated.pt (separate q/k/v by default)."""
    model = separate_qkv(state) if separate else collections.OrderedDict(state)
    ckpt = _checkpoint(cfg, model, trained_mp)
    torch.save(ckpt, path)
    return Path(path)


def write_mp_parts(folder: str | Path, cfg: OPTConfig, state: dict, mp: int,
                   stem: str = "reshard") -> list[Path]:
    """``{stem}-model_part-{r}.pt`` for r < mp, metaseq's model-parallel layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in range(mp):
        model = collections.OrderedDict(
            (n, shard(rule_for(n), t, r, mp).clone()) for n, t in state.items())
        path = folder / f"{stem}-model_part-{r}.pt"
        torch.save(_checkpoint(cfg, model, mp), path)
        paths.append(path)
    return paths


def _fsdp_groups(state: dict) -> list[tuple[str, list[str]]]:
    """FSDP wraps each layer; the root holds embeddings and the final layer norm."""
    groups: dict[str, list[str]] = collections.OrderedDict([("", [])])
    for name in state:
        if is_buffer(name):
            continue
        if name.startswith("decoder.layers."):
            i = name.split(".")[2]
            groups.setdefault(f"decoder.layers.{i}", []).append(name)
        else:
            groups[""].append(name)
    return list(groups.items())


def write_fsdp_shards(folder: str | Path, cfg: OPTConfig, state: dict, mp: int, dp: int,
                      stem: str = "checkpoint_last") -> list[Path]:
    """Flattened FSDP shards ``{stem}-model_part-{r}-shard{d}.pt`` with trailing padding."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in range(mp):
        part = {n: shard(rule_for(n), t, r, mp) for n, t in state.items()}
        flat_per_group, metas = [], []
        for fsdp_path, names in _fsdp_groups(part):
            rel = [n[len(fsdp_path) + 1:] if fsdp_path else n for n in names]
            flat = torch.cat([part[n].reshape(-1) for n in names])
            chunk = math.ceil(flat.numel() / dp)
            padded = torch.cat([flat, flat.new_zeros(chunk * dp - flat.numel())])
            flat_per_group.append((fsdp_path, padded.chunk(dp)))
            metas.append((fsdp_path, rel, [list(part[n].shape) for n in names],
                          [part[n].numel() for n in names], chunk * dp - flat.numel()))
        for d in range(dp):
            model = collections.OrderedDict()
            param_metadata = []
            for (fsdp_path, chunks), (_, rel, shapes, numels, pad) in zip(flat_per_group, metas):
                key = f"{fsdp_path}.flat_param_0" if fsdp_path else "flat_param_0"
                model[key] = chunks[d].clone()
                # Padding sits at the end of the concatenation: only the last shard has it.
                this_pad = pad if d == dp - 1 else 0
                param_metadata.append({"fsdp_path": fsdp_path, "params": {"flat_param_0": {
                    "names": rel, "shapes": shapes, "numels": numels, "padding": this_pad}},
                    "shared_param_info": []})
            model["decoder.version"] = state["decoder.version"].clone()
            ckpt = _checkpoint(cfg, model, mp, shard_metadata={
                "param_metadata": param_metadata, "buffer_names": ["decoder.version"]})
            path = folder / f"{stem}-model_part-{r}-shard{d}.pt"
            torch.save(ckpt, path)
            paths.append(path)
    return paths
