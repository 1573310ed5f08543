"""Check a folder of model-parallel parts (normally one written by ``reshard``).

Three checks, cheapest first: every tensor has the shape the cfg needs at the folder's degree;
replicated tensors (positions, layer norms, row-parallel biases, decoder.version) are
bit-identical in every part; each part's size and sha256 equal ``manifest.json``. The hash is
streamed in fixed-size chunks, so memory stays flat whatever the part size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from tqdm import tqdm

from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import Part, discover, model_config, open_part
from opt_serving.config import same_shape
from opt_serving.split_rules import Split, rule_for, separate_names, sharded_shape, third_shape

from .core import MANIFEST_FORMAT
from .manifest import ManifestError, read_manifest
from .inspect import cfg_degree

CHUNK = 8 << 20  # sha256 reads; big enough that syscalls do not matter, small for RAM
SHOW = 5  # tensor names listed per problem


def _expected(cfg, separate: bool, world: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in one part at degree ``world`` (k/v/q for separate files)."""
    out = {}
    for name, shape in cfg.param_shapes().items():
        if separate and rule_for(name) is Split.QKV:
            for sub in separate_names(name):
                out[sub] = sharded_shape(rule_for(sub), third_shape(shape), world)
        else:
            out[name] = sharded_shape(rule_for(name), shape, world)
    return out


def _names(names: list[str]) -> str:
    more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def _check_shapes(parts: list[Part]) -> list[str]:
    problems = []
    cfg = model_config(parts[0])
    world = len(parts)
    if cfg.num_heads % world or cfg.vocab_size % world or cfg.ffn_dim % world:
        problems.append(f"{len(parts)} parts is not a valid degree for {cfg.name} (valid: "
                        f"{', '.join(map(str, cfg.valid_mp_degrees()))})")
        return problems
    for part in parts:
        where = part.files[0]
        other = model_config(part)
        if not same_shape(other, cfg):
            problems.append(f"{where}: its cfg describes {other.name}, part 0's {cfg.name}")
            continue
        mp = cfg_degree(part.ckpt)
        if mp is not None and mp != world:
            problems.append(f"{where}: cfg.model.model_parallel_size is {mp} but the folder "
                            f"holds {world} parts")
        want = _expected(cfg, part.kind == "separate q,k,v", world)
        missing = [k for k in want if k not in part.tensors]
        extra = [k for k in part.tensors if k not in want]
        wrong = [f"{k} {list(part.tensors[k].shape)} (cfg needs {list(s)})"
                 for k, s in want.items()
                 if k in part.tensors and tuple(part.tensors[k].shape) != s]
        if missing:
            problems.append(f"{where}: {len(missing)} tensors missing: {_names(missing)}")
        if extra:
            problems.append(f"{where}: {len(extra)} unexpected tensors: {_names(extra)}")
        if wrong:
            problems.append(f"{where}: {len(wrong)} tensors with the wrong shape: "
                            f"{_names(wrong)}")
    return problems


def _check_replicated(parts: list[Part]) -> list[str]:
    """Compare bytes, not values: NaN == NaN and -0.0 != 0.0 here, as in a checksum."""
    problems = []
    names = [n for n in parts[0].tensors if rule_for(n) is Split.REPLICATED]
    for part in parts[1:]:
        differ = []
        for name in names:
            if name not in part.tensors:
                continue  # already reported as missing
            a, b = parts[0].tensors[name], part.tensors[name]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(
                    a.read().view(torch.uint8), b.read().view(torch.uint8)):
                differ.append(name)
        if differ:
            problems.append(f"{part.files[0]}: {len(differ)} replicated tensors differ from "
                            f"part 0's: {_names(differ)}")
    return problems


def sha256_file(path: str | os.PathLike, bar: tqdm | None = None) -> str:
    sha = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
            if bar is not None:
                bar.update(n)
    return sha.hexdigest()


def _check_manifest(folder: Path, files: list[str], progress: bool) -> list[str]:
    path = folder / "manifest.json"
    if not path.is_file():
        return [f"{path} is missing, so checksums were not checked (reshard writes one; a "
                "folder from elsewhere has none)"]
    try:
        manifest = read_manifest(path)
    except ManifestError as e:
        return [str(e)]
    entries = {e["file"]: e for e in manifest["parts"]}
    problems = []
    if manifest.get("format") != MANIFEST_FORMAT:
        problems.append(f"{path}: unknown format {manifest.get('format')!r}")
    if manifest.get("mp") != len(files):
        problems.append(f"{path} says mp {manifest.get('mp')} but the folder holds "
                        f"{len(files)} parts")
    on_disk = {os.path.basename(f) for f in files}
    for name in sorted(on_disk - set(entries)):
        problems.append(f"{folder / name} is not listed in manifest.json")
    present = []
    for name, entry in entries.items():
        if name not in on_disk:
            problems.append(f"{folder / name} is listed in manifest.json but missing")
        elif (folder / name).stat().st_size != entry.get("bytes"):
            problems.append(f"{folder / name} has {(folder / name).stat().st_size} bytes, the "
                            f"manifest says {entry.get('bytes')} (truncated or replaced)")
        else:
            present.append(name)
    for name in manifest.get("assets", []):
        if not (folder / name).is_file():
            problems.append(f"{folder / name} is listed in manifest.json but missing")
    total = sum(entries[n]["bytes"] for n in present)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="sha256",
              disable=not progress) as bar:
        for name in present:
            if sha256_file(folder / name, bar) != entries[name].get("sha256"):
                problems.append(f"{folder / name}: sha256 differs from manifest.json (the "
                                "file changed or is corrupt: reshard again or copy it again)")
    return problems


def verify(folder: str | os.PathLike, *, progress: bool = True) -> list[str]:
    """Problems found in ``folder`` (empty when it is sound). Bad arguments raise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(str(folder), "is not a folder", "pass the folder that holds "
                              "reshard-model_part-*.pt (and manifest.json)")
    try:
        groups = discover([str(folder)])
    except CheckpointError as e:
        return [str(e)]
    files = [shards[0] for shards in groups]
    parts, problems = [], []
    for rank, shards in enumerate(groups):
        try:
            parts.append(open_part(rank, shards))
        except CheckpointError as e:
            problems.append(str(e))
    if not problems:
        try:
            problems += _check_shapes(parts)
            if not problems:
                problems += _check_replicated(parts)
        except CheckpointError as e:  # e.g. a tensor's bytes past the end of the file
            problems.append(str(e))
    problems += _check_manifest(folder, files, progress)
    return problems
