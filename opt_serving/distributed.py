"""Where a worker sits in the job, and how the job is started.

Three launchers, one shape: our own ``spawn`` (one machine, one process per part), ``torchrun``
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) and SLURM's ``srun``
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master = first host of the node list).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "single", "spawn", "torchrun" or "slurm"

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """``gpu[003-004,010]`` -> ``gpu003`` (``scontrol show hostnames`` when it is there)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def rank_env(environ: Mapping[str, str] = os.environ) -> RankEnv:
    """Read the launcher's variables; a plain process is rank 0 of 1."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return RankEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                       int(environ.get("LOCAL_RANK", 0)), environ.get("MASTER_ADDR", "127.0.0.1"),
                       int(environ.get("MASTER_PORT", 29500)),
                       environ.get("OPT_LAUNCHER", "torchrun"))
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        addr = environ.get("MASTER_ADDR") or first_slurm_host(
            environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "127.0.0.1")))
        return RankEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                       int(environ.get("SLURM_LOCALID", 0)), addr,
                       int(environ.get("MASTER_PORT", 29500)), "slurm")
    return RankEnv(0, 1, 0, "127.0.0.1", 0, "single")


def pick_device(local_rank: int, requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_group(env: RankEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group: NCCL for CUDA devices, gloo otherwise."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s))


def _spawned(local_rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    env = RankEnv(local_rank, world_size, local_rank, "127.0.0.1", port, "spawn")
    fn(env, *args)


def spawn(fn: Callable, world_size: int, args: tuple = (), join: bool = True):
    """Run ``fn(env, *args)`` in ``world_size`` fresh processes on this machine.

    ``fn`` must be importable (a module-level function). A failing rank raises here with its
    traceback; the other ranks are terminated rather than left waiting in a collective.
    """
    port = free_port()
    return mp.start_processes(_spawned, args=(fn, world_size, port, args), nprocs=world_size,
                              join=join, start_method="spawn")
