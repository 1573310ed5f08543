"""Starting the engine: check the input, start the ranks, load each rank's part, size the KV
cache, run the loop. opt-serve (``server.serve``) and ``LLM`` both start this way.

Launchers: a plain process spawns one worker per part on this machine and is rank 0 itself;
under ``torchrun`` or ``srun`` every process reads its rank from the environment. Rank 0 runs
the engine; the others run ``ranks.worker_loop``. While rank 0 loads, it watches the spawned
workers: one that dies ends the start at once with the reason (a worker that never joins
would otherwise leave rank 0 waiting for the rendezvous timeout). While serving, a
``Supervisor`` keeps watching them, the engine and the length of each collective.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from constants import ServiceConstants
from opt_serving import distributed, kernels
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import read_config
from opt_serving.checkpoint.loading import load_model
from opt_serving.config import DTYPES, OPTConfig
from opt_serving.demo_tokenizer import ByteTokenizer
from opt_serving.model import SINGLE
from opt_serving.tensor_parallel import DistComm
from opt_serving.tokenizer import AssetError, Tokenizer, locate_assets

from .builder import build_runner, build_scheduler
from .engine import Engine
from .loop import start_loaded
from .naming import cli_name
from .ranks import Control, worker_loop
from .runner import StepRunner
from .graphs import default_buckets
from .sizing import (CacheLayout, TooSmall, check_fits, effective_limits, graph_bytes,
                     kv_tokens)

log = logging.getLogger("opt_serve")
EXIT_FAILED = 3  # a rank died or the engine failed while serving
EXIT_UNGUARDED = 86  # a spawned worker re-ran the caller's script (no __main__ guard)
UNGUARDED_HINT = (
    'Worker processes are started with "spawn": each one imports your script again, so the '
    "code that creates LLM(...) must run only in the main process. Put it under "
    '`if __name__ == "__main__":` (vLLM asks the same).')


class StartupError(Exception):
    """Bad input at start: the CLI prints the message as one paragraph and exits 2."""


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: str
    constants: ServiceConstants
    host: str = "127.0.0.1"
    port: int = 0
    assets: str | None = None
    api_key: str | None = None
    kv_tokens: int | None = None  # KV-cache positions per rank; default: GPU memory, or on a
    #                               CPU a quarter of the free RAM (at most 8 x max_seq_len)
    device: str | None = None  # "cpu" or "cuda"; default: cuda when present
    dtype: str | None = None  # fp32 / fp16 / bf16; default: fp16 on cuda, on a cpu bf16
    #                           where packed bf16 kernels run (AMX / AVX-512 bf16), else fp32
    demo_tokenizer: bool = False
    mp: int | None = None  # model-parallel degree; default: the number of parts
    threads: int | None = None  # HTTP worker threads; default: one per sequence that may
    #                             run (up to 1024) plus one per queued request
    prefix_caching: bool = True
    model_name: str | None = None
    ready_file: str | None = None  # JSON {url, pid, workers, ...} written once serving
    ping_interval_s: float = 1.0
    seq_len_given: bool = False  # --max-seq-len was asked for: refuse it rather than cut it
    cuda_graphs: bool = True  # decode-only steps replay CUDA graphs (on a GPU)
    naming: Callable[..., str] = cli_name  # how messages spell an option (flag or keyword)


@dataclass(frozen=True)
class Plan:
    """What every rank needs to start (picklable: spawned workers receive it)."""

    options: ServeOptions
    cfg: OPTConfig
    world_size: int
    device: str  # "cpu" or "cuda"
    dtype: str
    launcher: str


def prepare(options: ServeOptions, env: distributed.RankEnv) -> tuple[Plan, object | None]:
    """Check everything that can be wrong before a process is started or a weight is read.
    Returns the plan and, on rank 0, the tokenizer."""
    name = options.naming
    try:
        cfg, parts = read_config(options.checkpoint)
    except CheckpointError as e:
        raise StartupError(f"cannot serve {options.checkpoint}: {e}") from None
    under_launcher = env.launcher in ("torchrun", "slurm")
    world = env.world_size if under_launcher else (options.mp or parts)
    try:
        cfg.check_mp(world)
    except ValueError as e:
        raise StartupError(f"cannot serve {cfg.name} at model-parallel degree {world}: {e}. "
                           f"The checkpoint has {parts} part(s); reshard it with `reshard --mp "
                           f"M` or start M processes") from None
    if under_launcher and world != parts:
        log.warning("%d ranks for a checkpoint of %d parts: each rank cuts its piece from the "
                    "full tensors (reshard to %d parts to load faster)", world, parts, world)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise StartupError(f"{name('device', device)}: use cpu or cuda")
    if device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise StartupError(f"{name('device', 'cuda')}, but no CUDA device is visible")
        if not under_launcher and world > count:
            raise StartupError(f"{world} model-parallel ranks need {world} GPUs on this machine; "
                               f"{count} are visible. Reshard to {count} parts or run under "
                               f"torchrun / srun across machines")
    if env.rank == 0 and options.port:
        _check_port(options.host, options.port, name)
    dtype = options.dtype or ("fp16" if device == "cuda" else kernels.best_cpu_dtype())
    if dtype not in DTYPES:
        raise StartupError(f"{name('dtype', dtype)}: use one of {', '.join(DTYPES)}")
    if options.kv_tokens:  # sized now, before a process starts or a byte is allocated
        try:
            layout = CacheLayout.from_tokens(options.kv_tokens, options.constants)
            effective_limits(options.constants, cfg, layout, options.seq_len_given, name)
            if device == "cpu":  # a GPU's free memory is known once the weights are in
                check_fits(cfg, options.kv_tokens, world, dtype, torch.device("cpu"), name)
        except TooSmall as e:
            raise StartupError(str(e)) from None
    plan = Plan(options, cfg, world, device, dtype, env.launcher if under_launcher else
                ("spawn" if world > 1 else "single"))
    return plan, (_tokenizer(options) if env.rank == 0 else None)


def _tokenizer(options: ServeOptions):
    """metaseq's BPE from the files found, or the demo's stand-in when asked for."""
    name = options.naming
    path = Path(options.checkpoint)
    folder = path if path.is_dir() else path.parent
    try:
        assets = locate_assets(folder, options.assets, assets_option=name("assets", "DIR"))
    except AssetError as e:
        if not options.demo_tokenizer:
            raise StartupError(f"{e} (Or pass {name('demo_tokenizer', True)} to serve a random "
                               "demo model with a byte-level stand-in.)") from None
        log.warning("no tokenizer assets found: %s maps bytes to ids 4..259; only a random "
                    "demo model makes sense with it", name("demo_tokenizer", True))
        return ByteTokenizer()
    try:  # a wrong vocabulary (OpenAI's) is refused even with the demo tokenizer allowed
        return Tokenizer(assets)
    except AssetError as e:
        raise StartupError(str(e)) from None


def _check_port(host: str, port: int, name: Callable[..., str]) -> None:
    """Fail now, not after loading the weights, when the port is taken."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise StartupError(f"cannot listen on {host}:{port} ({e.strerror}): another server is "
                           f"running there; pass {name('port')} to choose another") from None


def _rank_device(plan: Plan, env: distributed.RankEnv) -> torch.device:
    if plan.device == "cuda":
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class Loaded:
    """One rank, ready to step: its runner, the control group, the cache's layout and the
    limits every surface reports (``max_seq_len`` is the effective one)."""

    runner: StepRunner
    control: Control
    layout: CacheLayout
    limits: ServiceConstants


def load_rank(plan: Plan, env: distributed.RankEnv) -> Loaded:
    """Join the group, load this rank's part and allocate its KV cache. Every rank calls it;
    the collectives inside line up."""
    opts, name = plan.options, plan.options.naming
    device = _rank_device(plan, env)
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", plan.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    distributed.init_group(env, device)
    comm = DistComm() if plan.world_size > 1 else SINGLE
    model, cfg = load_model(opts.checkpoint, comm=comm, device=device, dtype=DTYPES[plan.dtype])
    control = Control(plan.world_size, opts.constants.worker_timeout_s)
    if plan.world_size > 1:
        dist.barrier()  # under the long start-up timeout: ranks load at different speeds
    graphs = device.type == "cuda" and opts.cuda_graphs
    top = default_buckets(opts.constants.max_batch_size)[-1]
    reserve = graph_bytes(cfg, top, plan.world_size, plan.dtype) if graphs else 0
    tokens = control.agree_min(kv_tokens(cfg, opts.constants, plan.world_size, plan.dtype,
                                         model, device, opts.kv_tokens, reserve))
    try:
        layout = CacheLayout.from_tokens(tokens, opts.constants)
        check_fits(cfg, layout.tokens, plan.world_size, plan.dtype, device, name)
        limits = effective_limits(opts.constants, cfg, layout, opts.seq_len_given, name)
    except TooSmall as e:
        raise StartupError(str(e)) from None
    if device.type == "cpu" and kernels.available(DTYPES[plan.dtype]):
        kernels.pack(model)  # after sizing: the packed weights are not in the state dict
    # Every rank captures the same buckets in the same order (the all-reduces line up).
    runner = build_runner(model, layout, limits, cuda_graphs=graphs, device=device)
    return Loaded(runner, control, layout, limits)


def run_worker(plan: Plan, env: distributed.RankEnv) -> int:
    try:
        loaded = load_rank(plan, env)
        log.info("rank %d ready (pid %d)", env.rank, os.getpid())
        worker_loop(loaded.runner, loaded.control)
    except Exception:
        log.exception("rank %d failed; exiting so that rank 0 stops too", env.rank)
        return 1
    log.info("rank %d: shutdown", env.rank)
    return 0


def _spawned_worker(i: int, plan: Plan, port: int, log_level: str) -> None:
    configure_logging(i + 1, log_level)
    env = distributed.RankEnv(i + 1, plan.world_size, i + 1, "127.0.0.1", port, "spawn")
    code = run_worker(plan, env)
    logging.shutdown()
    os._exit(code)  # no interpreter teardown: gloo threads must not keep us alive


def configure_logging(rank: int, level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")


def refuse_unguarded_reentry() -> None:
    """In a spawned worker that is importing the caller's script again (its ``__main__``
    has no guard), stop at once with EXIT_UNGUARDED instead of starting workers of its own;
    the parent then says what to change."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        print(f"opt_serving: LLM(...) was called while a worker process was starting. "
              f"{UNGUARDED_HINT}", file=sys.stderr, flush=True)
        os._exit(EXIT_UNGUARDED)


def dead_worker(workers) -> str | None:
    """Why a spawned worker is gone, or None while all live."""
    for rank, proc in enumerate(workers, start=1):
        if not proc.is_alive():
            if proc.exitcode == EXIT_UNGUARDED:
                return (f"worker rank {rank} (pid {proc.pid}) re-ran your script instead of "
                        f"loading: {UNGUARDED_HINT}")
            return f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
    return None


class Supervisor(threading.Thread):
    """Rank 0's watchdog: dead spawned workers, a failed engine, a collective that takes longer
    than worker_timeout_s. On any of them: 503 for everyone, then exit EXIT_FAILED."""

    def __init__(self, workers, timeout_s: float, world_size: int, grace_s: float = 1.5):
        super().__init__(name="supervisor", daemon=True)
        self.engine = None  # attached once loaded: until then only the workers are watched
        self.workers, self.timeout_s = workers, timeout_s
        self.world_size, self.grace_s = world_size, grace_s
        self.stopping = threading.Event()

    def problem(self) -> str | None:
        dead = dead_worker(self.workers)
        if dead is not None or self.engine is None:
            return dead
        busy = self.engine.busy_since
        if self.world_size > 1 and busy is not None and time.monotonic() - busy > self.timeout_s:
            return f"a step has waited {self.timeout_s:g} s for the other ranks"
        return self.engine.failure

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            reason = self.problem()
            if reason is None or self.stopping.is_set():
                continue
            if self.engine is not None:
                self.engine.fail(reason)
            log.error("%s: not ready; exiting with code %d", reason, EXIT_FAILED)
            time.sleep(self.grace_s)  # let HTTP threads write their 503s
            stop_workers(self.workers)
            logging.shutdown()
            os._exit(EXIT_FAILED)


def stop_workers(workers, timeout: float = 5.0) -> None:
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()


def start_engine(plan: Plan, env: distributed.RankEnv, tokenizer,
                 workers=()) -> tuple[Engine, Loaded]:
    """Rank 0: load this rank's part and its KV cache, and start the engine loop. Loading and
    the loop share one thread (``loop.start_loaded``). A spawned worker that dies meanwhile
    ends the wait with a StartupError naming it."""
    opts = plan.options

    def build() -> tuple[Engine, Loaded]:
        rank = load_rank(plan, env)
        scheduler = build_scheduler(rank.limits, rank.layout, prefix_caching=opts.prefix_caching)
        return Engine(runner=rank.runner, control=rank.control, scheduler=scheduler,
                      tokenizer=tokenizer, request_timeout_s=rank.limits.request_timeout_s,
                      ping_interval_s=opts.ping_interval_s), rank

    def check() -> None:
        dead = dead_worker(workers)
        if dead is not None:  # the loading thread stays blocked in the rendezvous: a daemon
            raise StartupError(f"{dead} while the model was loading")

    return start_loaded(build, check)


def spawn_workers(plan: Plan, log_level: str = "INFO") -> tuple[list, distributed.RankEnv]:
    """Ranks 1 .. world - 1 as spawned processes on this machine; returns them and rank 0's
    environment."""
    port = distributed.free_port()
    ctx = mp.start_processes(_spawned_worker, args=(plan, port, log_level),
                             nprocs=plan.world_size - 1, join=False, start_method="spawn")
    return ctx.processes, distributed.RankEnv(0, plan.world_size, 0, "127.0.0.1", port, "spawn")
