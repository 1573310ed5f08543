"""Running opt-serve: the runtime's start-up, then the HTTP app on rank 0 under waitress.

Rank 0 starts the engine (``runtime.startup``) and serves HTTP; the other ranks run the
worker loop. A ``Supervisor`` thread on rank 0 watches the spawned workers, the engine and the
length of each collective: on a failure it marks the server not ready, answers pending
requests with 503, and exits non-zero a moment later instead of hanging in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import signal

from opt_serving import distributed
from opt_serving.runtime.startup import (Plan, ServeOptions, Supervisor, configure_logging,
                                         prepare, run_worker, spawn_workers, start_engine,
                                         stop_workers)

from .app import Service, create_app
from .wsgi import create_server

log = logging.getLogger("opt_serve")


def http_threads(options: ServeOptions) -> int:
    """Each open request holds an HTTP worker thread while it waits: enough of them that
    they, not the KV cache, never bound the batch."""
    c = options.constants
    return options.threads or min(c.max_batch_size, 1024) + c.max_queued_requests


def write_ready_file(path: str, info: dict) -> None:
    """What a supervisor or a test needs to reach the server, written atomically (a reader
    never sees half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def served_names(options: ServeOptions, default_name: str) -> tuple[str, ...]:
    """The names /v1/completions answers to: --model-name (else the model preset's name),
    and the checkpoint folder's name."""
    path = os.path.normpath(options.checkpoint)
    folder = os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))
    return tuple(dict.fromkeys(n for n in (options.model_name or default_name, folder) if n))


def run_primary(plan: Plan, env: distributed.RankEnv, tokenizer, workers=()) -> int:
    supervisor = Supervisor(workers, plan.options.constants.worker_timeout_s, plan.world_size)
    supervisor.start()  # from now: a worker that dies while loading stops us too
    opts = plan.options
    engine, loaded = start_engine(plan, env, tokenizer)
    limits, layout = loaded.limits, loaded.layout
    names = served_names(opts, plan.cfg.name)
    app = create_app(Service(engine=engine, tokenizer=tokenizer, limits=limits,
                             model_name=names[0], served_names=names, api_key=opts.api_key,
                             world_size=plan.world_size))
    metrics = app.extensions["opt_serve_metrics"]
    server = create_server(
        app, host=opts.host, port=opts.port, threads=max(16, http_threads(opts)),
        max_body_bytes=limits.max_body_bytes, read_timeout_s=limits.client_read_timeout_s,
        on_error=lambda status: metrics.http.labels("unparsed", str(status)).inc())
    supervisor.engine = engine
    for rank, proc in enumerate(workers, start=1):
        log.info("worker rank %d pid %d", rank, proc.pid)
    log.info("opt-serve: model %s, degree %d (%s), device %s, dtype %s, KV cache %d tokens per "
             "rank (%d blocks of %d, prefix cache %s), %d tokens per sequence, serving on "
             "http://%s:%d", names[0], plan.world_size, plan.launcher, plan.device, plan.dtype,
             layout.tokens, layout.num_blocks, layout.block_size,
             "on" if opts.prefix_caching else "off", limits.max_seq_len, opts.host,
             int(server.effective_port))
    if opts.ready_file:
        write_ready_file(opts.ready_file, {
            "url": f"http://{opts.host}:{int(server.effective_port)}", "pid": os.getpid(),
            "workers": {str(r): p.pid for r, p in enumerate(workers, start=1)},
            "world_size": plan.world_size, "model": names[0]})

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
