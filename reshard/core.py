"""N -> M resharding that streams: about two tensors in memory at a time, M writers open.

For every tensor of the model (in checkpoint order) each output rank's piece is cut straight
from the N memory-mapped input pieces (a view, or one concatenation into a reused buffer),
cast if asked, and handed to that rank's writer thread, which appends it to its part while
the next tensor is cut. Everything is written into a hidden staging folder next to the output
and renamed into place at the end, so a failure leaves nothing behind and the input is never
touched.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from assets import FILES as ASSET_FILES
from opt_serving.checkpoint.assemble import GlobalView, QKVLayout
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import dtype_name, open_parts
from opt_serving.checkpoint.metaseq import part_metadata
from opt_serving.checkpoint.writer import CheckpointWriter, TensorSpec
from opt_serving.config import DTYPES, closest_preset
from opt_serving.split_rules import (FUSED_ORDER, Split, rule_for, separate_names,
                                     sharded_shape, stored_dtype, third_shape)

ASSETS = tuple(ASSET_FILES)  # the tokenizer files copied along when they sit beside the input
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
    """Beside the input: ``mp{M}`` next to a file, and next to a folder too (a folder named
    like ``mp8`` gets a sibling ``mp1``; any other folder ``<name>-mp{M}``)."""
    first = Path(inputs[0])
    if not first.is_dir():
        return first.parent / f"mp{mp}"
    folder = first.resolve()
    is_degree = folder.name.startswith("mp") and folder.name[2:].isdigit()
    return folder.parent / (f"mp{mp}" if is_degree else f"{folder.name}-mp{mp}")


def _prepare_output(out: Path, input_files: list[str], overwrite: bool) -> None:
    """Refuse an output folder that overlaps the input: --overwrite replaces the folder's
    whole tree, so no input may sit anywhere below it (symlinks resolved)."""
    target = out.resolve()
    for f in input_files:
        real = Path(f).resolve()
        if target == real or target in real.parents:
            raise CheckpointError(str(out), f"contains the input {f}; writing there (or "
                                  "replacing it with --overwrite) would destroy the input",
                                  "choose an --output-dir outside the input's folder tree")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(str(out), "exists and is not a folder",
                                  "choose another --output-dir")
        inside = list(out.iterdir())
        if inside and not overwrite:
            raise CheckpointError(str(out), f"is not empty ({len(inside)} entries)",
                                  "choose an empty or new --output-dir, or pass --overwrite to "
                                  "replace its contents")


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest first), to remove on failure."""
    created = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        created.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


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
            out += [(sub, name, i) for i, sub in enumerate(separate_names(name))]
        else:
            out.append((name, name, None))
    return out


class Cancelled(Exception):
    """``cancel`` was set: the run stopped at a tensor boundary and removed what it wrote."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled


def reshard(inputs: list[str], mp: int, output_dir: str | os.PathLike | None = None, *,
            dtype: str = "keep", overwrite: bool = False, input_qkv: str | None = None,
            qkv_out: str = "fused", progress: bool = True,
            cancel: threading.Event | None = None) -> ReshardResult:
    """Reshard the checkpoint in ``inputs`` to ``mp`` parts (see ``reshard --help``).

    ``cancel``: set it (from a signal handler, another thread) to stop cleanly. It is checked
    between tensors, never inside torch's zip writer, which cannot survive an exception raised
    while it calls back into Python."""
    started = time.perf_counter()
    parts = open_parts(inputs)
    view = GlobalView(parts, QKVLayout.parse(input_qkv) if input_qkv else None)
    cfg = view.cfg
    try:
        cfg.check_mp(mp)
    except ValueError as e:  # name the file, as every other bad-input message does
        raise CheckpointError(parts[0].files[0], f"holds a model that cannot be split {mp} "
                              f"ways: {e}", "pass one of those values as --mp") from None
    if qkv_out == "separate" and mp != 1:
        raise ValueError("--qkv-out separate writes consolidated (--mp 1) files only: metaseq "
                         "parts always hold fused qkv_proj")
    if dtype != "keep" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of fp16, bf16, fp32, keep")
    out_dtype = view.dtype if dtype == "keep" else DTYPES[dtype]
    input_files = [f for p in parts for f in p.files]

    # Absolute, so that the folder printed at the end is unambiguous.
    out = (Path(output_dir) if output_dir else default_output_dir(inputs, mp)).absolute()
    _prepare_output(out, input_files, overwrite)
    created = _make_parents(out.parent)
    try:
        return _write(view, parts, cfg, mp, out, out_dtype, dtype, qkv_out, input_files,
                      progress, started, cancel)
    except BaseException:
        _remove_empty(created)
        raise


def _write(view: GlobalView, parts: list, cfg, mp: int, out: Path, out_dtype: torch.dtype,
           dtype: str, qkv_out: str, input_files: list[str], progress: bool,
           started: float, cancel: threading.Event | None) -> ReshardResult:
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
            shape = shapes[gname] if third is None else third_shape(shapes[gname])
            model[oname] = TensorSpec(str(i), sharded_shape(rule_for(oname), shape, mp),
                                      stored_dtype(oname, out_dtype))
        specs.append(model)
    origin = ", ".join(os.path.basename(f) for f in input_files[:4]) + (
        f" (+{len(input_files) - 4} more)" if len(input_files) > 4 else "")
    meta = part_metadata(parts[0].ckpt, cfg, mp, origin=origin,
                         qkv_layout=FUSED_ORDER if qkv_out == "fused" else "separate")

    # A fresh name: nothing that already exists (an input, say) is ever removed as staging.
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:  # name the folder asked for, not the staging name we made up
        raise CheckpointError(str(out), f"cannot be written ({e.strerror})", "choose an "
                              "--output-dir in a folder you may write to") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output folder's mode
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(CheckpointWriter(staging / part_name(r),
                                                            {"model": specs[r], **meta}))
                       for r in range(mp)]
            bar = stack.enter_context(tqdm(total=sum(s.nbytes for m in specs for s in m.values()),
                                           unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"reshard -> mp{mp}", disable=not progress))
            _stream(view, names, specs, writers, bar, cancel)
        manifest_parts = [{"file": part_name(r), "bytes": w.size, "sha256": w.sha256}
                          for r, w in enumerate(writers)]
        copied = _copy_assets(input_files[0], staging)
        seconds = time.perf_counter() - started
        manifest = {
            "format": MANIFEST_FORMAT, "mp": mp, "dtype": dtype_name(out_dtype),
            "qkv_layout": FUSED_ORDER if qkv_out == "fused" else "separate",
            "model": {"preset": closest_preset(cfg).name, **cfg.__dict__},
            "source": {"files": [os.path.abspath(f) for f in input_files], "mp": view.n,
                       "kind": parts[0].kind, "dtype": dtype_name(view.dtype)},
            "parts": manifest_parts, "assets": copied,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _check(cancel)
        _publish(staging, out)
    except CheckpointError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if not e.path.startswith(str(staging)):
            raise
        # A write failed (disk full): name the file the user asked for, not the staging one.
        raise CheckpointError(str(_user_path(out, staging, e.path)), e.problem,
                              e.fix) from None
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        for attr in ("filename", "filename2"):
            name = getattr(e, attr)
            if name and str(name).startswith(str(staging)):
                setattr(e, attr, str(_user_path(out, staging, name)))
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ReshardResult(out, manifest_parts, seconds, sum(p["bytes"] for p in manifest_parts),
                         cfg.name, view.n, mp)


def _user_path(out: Path, staging: Path, name: str | os.PathLike) -> Path:
    """The path the user asked for of a file in the staging folder: the staging folder's and
    the writer's temporary names (".partial-<pid>") are ours, not theirs."""
    return out / re.sub(r"\.partial-\d+$", "", str(Path(name).relative_to(staging)))


def _stream(view: GlobalView, names: list, specs: list[dict], writers: list[CheckpointWriter],
            bar: tqdm, cancel: threading.Event | None = None) -> None:
    """Every tensor: cut each rank's piece from the inputs, hand it to that rank's writer.

    The writers write tensor i while the pieces of tensor i + 1 are cut (a view of the mapped
    input, or one copy; a second one only for a dtype cast), and we wait for tensor i before
    handing over i + 1: at most two tensors' worth of pieces are alive at any time, whatever
    the model size.
    """
    trim = _malloc_trim()
    scratch = _Scratch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pending: list = []
    try:
        for i, (oname, gname, third) in enumerate(names):
            _check(cancel)
            pieces = []
            for r, spec in enumerate(rank_specs[oname] for rank_specs in specs):
                # Tensor i uses buffer set i % 2: set (i - 1) % 2 is still being written.
                alloc = functools.partial(scratch.take, (r, i % 2))
                p = view.piece(gname, r, len(writers), third, alloc)
                if not p.is_contiguous():  # columns of one input (row-parallel weights)
                    p = alloc(tuple(p.shape), p.dtype).copy_(p)
                pieces.append(p.to(spec.dtype))  # a copy only for --dtype
            _wait(pending, bar)
            trim()
            pending = [(w.submit(rank_specs[oname], p), p.nbytes)
                       for w, rank_specs, p in zip(writers, specs, pieces)]
            del pieces, p
        _wait(pending, bar)
    finally:
        torch.set_num_threads(threads)


class _Scratch:
    """Reusable piece buffers, two sets per rank. Fresh memory for every piece would cost a
    page fault per 4 KiB (1.3 s of kernel time per 2.6 GB here) and fragment the heap."""

    def __init__(self):
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def take(self, key: tuple[int, int], shape: tuple[int, ...], dtype: torch.dtype):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)


def _wait(pending: list, bar: tqdm) -> None:
    for future, nbytes in pending:
        future.result()  # re-raises a write error (disk full) here, in the main thread
        bar.update(nbytes)


def _malloc_trim():
    """glibc keeps freed blocks under its dynamic mmap threshold (up to 32 MiB) in the heap;
    over hundreds of tensors of mixed sizes the heap fragments and RSS creeps up with the
    layer count (0.25 -> 0.6 GB over opt-1.3b's 24 layers). Handing free pages back after
    each tensor keeps peak memory flat. A no-op where malloc_trim does not exist."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: fn(0)


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
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)  # onto the empty folder just made
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
