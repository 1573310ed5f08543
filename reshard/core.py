"""N -> M resharding that streams: one full tensor in memory at a time, M writers open.

For every tensor of the model (in checkpoint order) the N input pieces are merged into the
full tensor, cast, cut into M pieces with the shared split rules, and each piece is appended
to its output part. Everything is written into a hidden staging folder next to the output and
renamed into place at the end, so a failure leaves nothing behind and the input is never
touched.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from opt_serving.checkpoint.assemble import GlobalView, QKVLayout
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import dtype_name, open_parts
from opt_serving.checkpoint.metaseq import part_metadata
from opt_serving.checkpoint.writer import CheckpointWriter, TensorSpec
from opt_serving.config import closest_preset
from opt_serving.split_rules import Split, rule_for, shard, sharded_shape, unfuse_kvq

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ASSETS = ("gpt2-vocab.json", "gpt2-merges.txt")
MANIFEST_FORMAT = "opt-serving-reshard/1"


def part_name(rank: int) -> str:
    return f"reshard-model_part-{rank}.pt"


@dataclass(frozen=True)
class ReshardResult:
    output_dir: Path
    parts: list[dict]  # {"file", "bytes", "sha256"}
    seconds: float
    total_bytes: int
    model: str
    source_mp: int
    mp: int

    def summary(self) -> str:
        rate = self.total_bytes / max(self.seconds, 1e-9) / 1e6
        return (f"resharded {self.model} from mp{self.source_mp} to mp{self.mp}: "
                f"{len(self.parts)} part(s), {self.total_bytes / 1e9:.2f} GB in {self.seconds:.1f} s "
                f"({rate:.0f} MB/s) -> {self.output_dir} (checksums in manifest.json)")


def default_output_dir(inputs: list[str], mp: int) -> Path:
    first = Path(inputs[0])
    base = first if first.is_dir() else first.parent
    return base / f"mp{mp}"


def _prepare_output(out: Path, input_files: list[str], overwrite: bool) -> None:
    resolved = {Path(f).resolve() for f in input_files}
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(str(out), "exists and is not a folder",
                                  "choose another --output-dir")
        inside = [p for p in out.iterdir()]
        if any(p.resolve() in resolved for p in inside):
            raise CheckpointError(str(out), "holds the input files; writing there could "
                                  "overwrite them", "choose another --output-dir")
        if inside and not overwrite:
            raise CheckpointError(str(out), f"is not empty ({len(inside)} entries)",
                                  "choose an empty or new --output-dir, or pass --overwrite to "
                                  "replace its contents")


def _check_space(parent: Path, needed: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < needed * 1.01 + (16 << 20):
        raise CheckpointError(str(parent), f"has {free / 1e9:.2f} GB free but the output needs "
                              f"about {needed / 1e9:.2f} GB", "free space or choose another "
                              "--output-dir; nothing was written")


def _output_names(view: GlobalView, qkv_out: str) -> list[tuple[str, str, int | None]]:
    """(output name, global name, index into [k, v, q] when writing separate projections)."""
    out = []
    for name in view.names():
        if qkv_out == "separate" and rule_for(name) is Split.QKV:
            base = name.replace("qkv_proj", "{}_proj")
            out += [(base.format(x), name, i) for i, x in enumerate("kvq")]
        else:
            out.append((name, name, None))
    return out


def reshard(inputs: list[str], mp: int, output_dir: str | os.PathLike | None = None, *,
            dtype: str = "keep", overwrite: bool = False, input_qkv: str | None = None,
            qkv_out: str = "fused", progress: bool = True) -> ReshardResult:
    """Reshard the checkpoint in ``inputs`` to ``mp`` parts (see ``reshard --help``)."""
    started = time.perf_counter()
    parts = open_parts(inputs)
    view = GlobalView(parts, QKVLayout.parse(input_qkv) if input_qkv else None)
    cfg = view.cfg
    cfg.check_mp(mp)
    if qkv_out == "separate" and mp != 1:
        raise ValueError("--qkv-out separate writes consolidated (--mp 1) files only: metaseq "
                         "parts always hold fused qkv_proj")
    if dtype != "keep" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of fp16, bf16, fp32, keep")
    out_dtype = view.dtype if dtype == "keep" else DTYPES[dtype]
    input_files = [f for p in parts for f in p.files]

    out = Path(output_dir) if output_dir else default_output_dir(inputs, mp)
    _prepare_output(out, input_files, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    total = cfg.param_count() * itemsize
    # Replicated tensors are written M times.
    replicated = sum(torch.Size(s).numel() for n, s in cfg.param_shapes().items()
                     if rule_for(n) is Split.REPLICATED)
    _check_space(out.parent, total + (mp - 1) * replicated * itemsize)

    names = _output_names(view, qkv_out)
    shapes = cfg.param_shapes()
    specs = []  # per rank: output name -> TensorSpec
    for r in range(mp):
        model = collections.OrderedDict()
        for i, (oname, gname, third) in enumerate(names):
            shape = shapes[gname] if third is None else (shapes[gname][0] // 3, *shapes[gname][1:])
            model[oname] = TensorSpec(str(i), sharded_shape(rule_for(oname), shape, mp),
                                      torch.float32 if oname == "decoder.version" else out_dtype)
        specs.append(model)
    origin = ", ".join(os.path.basename(f) for f in input_files[:4]) + (
        f" (+{len(input_files) - 4} more)" if len(input_files) > 4 else "")
    meta = part_metadata(parts[0].ckpt, cfg, mp, origin=origin,
                         qkv_layout="kvq" if qkv_out == "fused" else "separate")

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(CheckpointWriter(staging / part_name(r),
                                                            {"model": specs[r], **meta}))
                       for r in range(mp)]
            bar = stack.enter_context(tqdm(total=sum(s.nbytes for m in specs for s in m.values()),
                                           unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"reshard -> mp{mp}", disable=not progress))
            current, full = None, None
            for oname, gname, third in names:
                if gname != current:
                    full, current = None, gname  # free the previous tensor first
                    full = view.read(gname)
                    if gname != "decoder.version":
                        full = full.to(out_dtype)
                tensor = full if third is None else unfuse_kvq(full)[third]
                for r in range(mp):
                    spec = specs[r][oname]
                    writers[r].write(spec, shard(rule_for(oname), tensor, r, mp).to(spec.dtype))
                    bar.update(spec.nbytes)
        manifest_parts = [{"file": part_name(r), "bytes": w.size, "sha256": w.sha256}
                          for r, w in enumerate(writers)]
        copied = _copy_assets(input_files[0], staging)
        seconds = time.perf_counter() - started
        manifest = {
            "format": MANIFEST_FORMAT, "mp": mp, "dtype": dtype_name(out_dtype),
            "qkv_layout": "kvq" if qkv_out == "fused" else "separate",
            "model": {"preset": closest_preset(cfg).name, **cfg.__dict__},
            "source": {"files": [os.path.abspath(f) for f in input_files], "mp": view.n,
                       "kind": parts[0].kind, "dtype": dtype_name(view.dtype)},
            "parts": manifest_parts, "assets": copied,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ReshardResult(out, manifest_parts, seconds, sum(p["bytes"] for p in manifest_parts),
                         cfg.name, view.n, mp)


def _copy_assets(first_input: str, staging: Path) -> list[str]:
    src = Path(first_input).parent
    copied = []
    for name in ASSETS:
        if (src / name).is_file():
            shutil.copyfile(src / name, staging / name)
            copied.append(name)
    return copied


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished staging folder into place (an old one is removed only afterwards)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
