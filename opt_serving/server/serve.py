"""Starting opt-serve: check the input, start the ranks, load each rank's part, serve HTTP.

Launchers: a plain process spawns one worker per part on this machine and is rank 0 itself;
under ``torchrun`` or ``srun`` every process reads its rank from the environment. Rank 0 runs
the engine and the WSGI server (waitress); the others run ``worker.worker_loop``. A supervisor
thread on rank 0 watches the spawned workers, the engine and the length of each collective: on
a failure it marks the server not ready, answers pending requests with 503, and exits non-zero
a moment later instead of hanging in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from constants import ServiceConstants
from opt_serving import distributed, kernels
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import read_config
from opt_serving.checkpoint.loading import load_model
from opt_serving.config import DTYPES, OPTConfig
from opt_serving.model import SINGLE, KVCache
from opt_serving.tensor_parallel import DistComm
from opt_serving.tokenizer import AssetError, Tokenizer, locate_assets

from .app import Service, create_app
from .engine import Engine
from opt_serving.decoding.scheduler import Scheduler
from .sizing import CacheLayout, TooSmall, http_threads, kv_tokens
from .wsgi import create_server
from opt_serving.decoding.work import ModelRunner

from .ranks import Control, worker_loop

log = logging.getLogger("opt_serve")
EXIT_FAILED = 3  # a rank died or the engine failed while serving


class StartupError(Exception):
    """Bad input at start: the CLI prints the message as one paragraph and exits 2."""


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: str
    constants: ServiceConstants
    host: str
    port: int
    assets: str | None = None
    api_key: str | None = None
    kv_tokens: int | None = None  # KV-cache positions per rank; default: GPU memory or
    #                               constants.max_batch_tokens on CPU
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
    path = Path(options.checkpoint)
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
        raise StartupError(f"--device {device}: use cpu or cuda")
    if device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise StartupError("--device cuda, but no CUDA device is visible")
        if not under_launcher and world > count:
            raise StartupError(f"{world} model-parallel ranks need {world} GPUs on this machine; "
                               f"{count} are visible. Reshard to {count} parts or run under "
                               f"torchrun / srun across machines")
    if env.rank == 0 and options.port:
        _check_port(options.host, options.port)
    dtype = options.dtype or ("fp16" if device == "cuda" else kernels.best_cpu_dtype())
    if dtype not in DTYPES:
        raise StartupError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    plan = Plan(options, cfg, world, device, dtype, env.launcher if under_launcher else
                ("spawn" if world > 1 else "single"))
    tokenizer = None
    if env.rank == 0:
        folder = path if path.is_dir() else path.parent
        try:
            assets = locate_assets(folder, options.assets)
        except AssetError as e:
            if not options.demo_tokenizer:
                raise StartupError(f"{e} (Or pass --demo-tokenizer to serve a random demo "
                                   "model with a byte-level stand-in.)") from None
            assets = None
        try:  # a wrong vocabulary (OpenAI's) is refused even with --demo-tokenizer
            tokenizer = Tokenizer(assets) if assets else None
        except AssetError as e:
            raise StartupError(str(e)) from None
        if tokenizer is None:
            from .demo_tokenizer import ByteTokenizer
            log.warning("no tokenizer assets found: --demo-tokenizer maps bytes to ids 4..259; "
                        "only a random demo model makes sense with it")
            tokenizer = ByteTokenizer()
    return plan, tokenizer


def _check_port(host: str, port: int) -> None:
    """Fail now, not after loading the weights, when the port is taken."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise StartupError(f"cannot listen on {host}:{port} ({e.strerror}): another server is "
                           "running there; pass --port to choose another") from None


def _rank_device(plan: Plan, env: distributed.RankEnv) -> torch.device:
    if plan.device == "cuda":
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_rank(plan: Plan, env: distributed.RankEnv) -> tuple[ModelRunner, Control, CacheLayout]:
    """Join the group, load this rank's part and allocate its KV cache. Every rank calls it;
    the collectives inside line up."""
    device = _rank_device(plan, env)
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", plan.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    distributed.init_group(env, device)
    comm = DistComm() if plan.world_size > 1 else SINGLE
    model, cfg = load_model(plan.options.checkpoint, comm=comm, device=device,
                            dtype=DTYPES[plan.dtype])
    control = Control(plan.world_size, plan.options.constants.worker_timeout_s)
    if plan.world_size > 1:
        dist.barrier()  # under the long start-up timeout: ranks load at different speeds
    try:
        layout = CacheLayout.from_tokens(control.agree_min(kv_tokens(plan, model, device)),
                                         plan.options.constants)
    except TooSmall as e:
        raise StartupError(str(e)) from None
    if device.type == "cpu" and kernels.available(DTYPES[plan.dtype]):
        kernels.pack(model)  # after sizing: the packed weights are not in the state dict
    cache = KVCache(cfg, layout.num_blocks, layout.block_size, dtype=DTYPES[plan.dtype],
                    device=device, tp_size=plan.world_size)
    return ModelRunner(model, cache, device), control, layout


def run_worker(plan: Plan, env: distributed.RankEnv) -> int:
    try:
        runner, control, _ = load_rank(plan, env)
        log.info("rank %d ready (pid %d)", env.rank, os.getpid())
        worker_loop(runner, control)
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
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                return f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
        if self.engine is None:
            return None
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


def start_engine(plan: Plan, env: distributed.RankEnv, tokenizer) -> tuple[Engine, CacheLayout]:
    """Rank 0: load this rank's part and its KV cache, and start the engine loop (opt-serve
    and the offline ``LLM`` both run it). Loading and the loop share one thread, so that
    every torch op of this rank runs on it (``Engine.run_here`` says why)."""
    opts, c = plan.options, plan.options.constants
    box: dict = {}
    loaded = threading.Event()

    def engine_thread() -> None:
        try:
            runner, control, layout = load_rank(plan, env)
            scheduler = Scheduler(num_blocks=layout.num_blocks, block_size=layout.block_size,
                                  max_seqs=c.max_batch_size, max_queued=c.max_queued_requests,
                                  step_tokens=c.max_batch_tokens, max_seq_len=c.max_seq_len,
                                  prefix_caching=opts.prefix_caching)
            box["engine"] = Engine(runner=runner, control=control, scheduler=scheduler,
                                   tokenizer=tokenizer, request_timeout_s=c.request_timeout_s,
                                   ping_interval_s=opts.ping_interval_s)
            box["layout"] = layout
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = e
            return
        finally:
            loaded.set()
        box["engine"].run_here()

    threading.Thread(target=engine_thread, name="engine-loop", daemon=True).start()
    loaded.wait()
    if "error" in box:
        raise box["error"]
    box["engine"].wait_running()
    return box["engine"], box["layout"]


def spawn_workers(plan: Plan, log_level: str = "INFO") -> tuple[list, distributed.RankEnv]:
    """Ranks 1 .. world - 1 as spawned processes on this machine; returns them and rank 0's
    environment."""
    port = distributed.free_port()
    ctx = mp.start_processes(_spawned_worker, args=(plan, port, log_level),
                             nprocs=plan.world_size - 1, join=False, start_method="spawn")
    return ctx.processes, distributed.RankEnv(0, plan.world_size, 0, "127.0.0.1", port, "spawn")


def write_ready_file(path: str, info: dict) -> None:
    """What a supervisor or a test needs to reach the server, written atomically (a reader
    never sees half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def run_primary(plan: Plan, env: distributed.RankEnv, tokenizer, workers=()) -> int:
    supervisor = Supervisor(workers, plan.options.constants.worker_timeout_s, plan.world_size)
    supervisor.start()  # from now: a worker that dies while loading stops us too
    opts, c = plan.options, plan.options.constants
    engine, layout = start_engine(plan, env, tokenizer)
    name = opts.model_name or plan.cfg.name
    app = create_app(Service(engine=engine, tokenizer=tokenizer, limits=c, model_name=name,
                             api_key=opts.api_key, world_size=plan.world_size))
    metrics = app.extensions["opt_serve_metrics"]
    server = create_server(
        app, host=opts.host, port=opts.port, threads=max(16, http_threads(opts)),
        max_body_bytes=c.max_body_bytes, read_timeout_s=c.client_read_timeout_s,
        on_error=lambda status: metrics.http.labels("unparsed", str(status)).inc())
    supervisor.engine = engine
    for rank, proc in enumerate(workers, start=1):
        log.info("worker rank %d pid %d", rank, proc.pid)
    log.info("opt-serve: model %s, degree %d (%s), device %s, dtype %s, KV cache %d tokens per "
             "rank (%d blocks of %d, prefix cache %s), serving on http://%s:%d", name,
             plan.world_size, plan.launcher, plan.device, plan.dtype, layout.tokens,
             layout.num_blocks, layout.block_size, "on" if opts.prefix_caching else "off",
             opts.host, int(server.effective_port))
    if opts.ready_file:
        write_ready_file(opts.ready_file, {
            "url": f"http://{opts.host}:{int(server.effective_port)}", "pid": os.getpid(),
            "workers": {str(r): p.pid for r, p in enumerate(workers, start=1)},
            "world_size": plan.world_size, "model": name})

    def _interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _interrupt)
    server.run()  # returns on SIGINT / SIGTERM
    log.info("shutting down")
    supervisor.stopping.set()
    engine.shutdown()
    stop_workers(workers, timeout=10.0)
    return 0


def serve(options: ServeOptions, log_level: str = "INFO") -> int:
    """Start opt-serve in this process (and its workers); returns the exit code."""
    env = distributed.rank_env()
    plan, tokenizer = prepare(options, env)
    configure_logging(env.rank, log_level)  # after the checks: they only raise
    if plan.launcher in ("torchrun", "slurm"):
        if env.rank == 0:
            return run_primary(plan, env, tokenizer)
        code = run_worker(plan, env)
        logging.shutdown()
        os._exit(code)  # as spawned workers: gloo threads must not keep the process alive
    if plan.world_size == 1:
        return run_primary(plan, env, tokenizer)
    workers, env0 = spawn_workers(plan, log_level)
    try:
        return run_primary(plan, env0, tokenizer, workers)
    finally:
        stop_workers(workers)

