"""Tensor-parallel self-check: does degree M reproduce the single-process logits?

``python -m opt_serving.testing.selfcheck CHECKPOINT --tp 2 [--device cuda]`` spawns M ranks (gloo on
CPU, NCCL on GPU), each loading only its own shard, and compares their logits with one
process. The test suite runs it on CPU; run it on a GPU machine to check the NCCL path.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from opt_serving import distributed
from opt_serving.checkpoint.loading import load_model
from opt_serving.config import DICT_SIZE, DTYPES
from opt_serving.model import SINGLE

PROBE = [[2, 133, 812, 16, 10, 4, 50118, 1000, 7, 9], [2, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def _logits(checkpoint: str, comm, device: str, dtype: torch.dtype | None) -> torch.Tensor:
    model, _ = load_model(checkpoint, comm=comm, device=device, dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor(PROBE, device=device)).float().cpu()[..., :DICT_SIZE]


def _rank_main(env, checkpoint: str, out: str, device: str | None, dtype: torch.dtype | None):
    from opt_serving.tensor_parallel import DistComm

    dev = distributed.pick_device(env.local_rank, device)
    distributed.init_group(env, dev)
    logits = _logits(checkpoint, DistComm(), str(dev), dtype)
    if env.rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def tp_logits(checkpoint: str, tp: int, device: str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of the probe batch computed by ``tp`` spawned ranks."""
    if tp == 1:
        return _logits(checkpoint, SINGLE, device or "cpu", dtype)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        distributed.spawn(_rank_main, tp, (checkpoint, out, device, dtype))
        return torch.load(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint file or folder")
    p.add_argument("--tp", type=int, nargs="+", default=[2], help="degrees to compare with 1")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = tp_logits(args.checkpoint, 1, device, dtype)
    worst = 0.0
    for tp in args.tp:
        diff = (tp_logits(args.checkpoint, tp, device, dtype) - ref).abs().max().item()
        worst = max(worst, diff)
        print(f"tp={tp} on {device} ({args.dtype}): max |logit difference| vs tp=1 = {diff:.3g}")
    return 0 if worst < (1e-4 if dtype == torch.float32 else 5e-2) else 1


if __name__ == "__main__":
    sys.exit(main())
