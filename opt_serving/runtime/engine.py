"""The generation engine on rank 0: one loop thread that owns the scheduler and runs the steps.

Callers (HTTP threads, ``LLM.generate``) call ``submit`` (which returns a ``RequestHandle``
once the loop has queued the request, or raises QueueFull / RequestError) and ``cancel``; everything else happens on the
loop thread, so the scheduler needs no lock. Each iteration: take new requests and
cancellations, expire requests past their deadline, then one ``decoding.step`` (plan, send the
step's work to the other ranks, forward, sample, stop) whose events go to the handles, found
by the sequences' request group.

Failures: with one rank, an exception while running a batch fails only the requests in that
batch (503 for out-of-memory, else 500) and the loop goes on. With several ranks a failed
forward may have left the others inside a collective, so it is fatal: the engine marks itself
failed, answers every pending request with 503, and the process supervisor (``serve``) exits.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from opt_serving.decoding.scheduler import Scheduler
from opt_serving.decoding.step import Event, StepFailed, Stepper
from opt_serving.decoding.work import StepWork
from opt_serving.protocol import CompletionRequest, EngineError, timeout_error
from opt_serving.tokenizer import TextTokenizer

from .handles import RequestHandle
from .ranks import Control
from .runner import StepRunner

log = logging.getLogger("opt_serve.engine")


@dataclass(frozen=True)
class Submit:
    """Inbox message: queue this request."""

    handle: RequestHandle


@dataclass(frozen=True)
class Cancel:
    """Inbox message: the client is gone; free the request's cache."""

    handle: RequestHandle


@dataclass(frozen=True)
class Wake:
    """Inbox message: look at the stop flag now (shutdown)."""


Message = Submit | Cancel | Wake


@dataclass
class EngineStats:
    """Counters the loop updates and /metrics reads (plain ints: one writer)."""

    queued_requests: int = 0
    running_sequences: int = 0
    tokens_generated: int = 0
    steps: int = 0
    batches_failed: int = 0
    forward_seconds: float = 0.0  # inside the model's forwards (this rank's view)
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which were found there (not computed again)
    preemptions: int = 0
    prompt_tokens: int = 0  # of the sequences accepted (what no cache would compute)
    prompt_tokens_computed: int = 0


class Engine:
    def __init__(self, *, runner: StepRunner, control: Control, scheduler: Scheduler,
                 tokenizer: TextTokenizer, request_timeout_s: float, ping_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.runner, self.control, self.scheduler = runner, control, scheduler
        # Request deadlines and pings follow ``clock`` (tests drive it); the collective
        # watchdog (busy_since) always reads the real monotonic clock.
        self.clock = clock
        self.tokenizer = tokenizer
        self.request_timeout_s = request_timeout_s
        self.ping_interval_s = ping_interval_s
        self.stats = EngineStats()
        self.failure: str | None = None  # set once: the engine serves nothing after it
        self.busy_since: float | None = None  # when the current collective began (watchdog)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}  # scheduler group -> request
        self._stop = threading.Event()
        self._last_ping = clock()
        self.stepper = Stepper(scheduler, self._forward, tokenizer.token_bytes)
        self._thread: threading.Thread | None = None  # the loop's, once it runs
        self._running = threading.Event()  # set when it does: ``wait_running``

    # -- any thread --------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run the loop on a thread of its own (see ``run_here`` for why not always)."""
        threading.Thread(target=self.run_here, name="engine-loop", daemon=True).start()
        self._running.wait()
        return self

    def run_here(self) -> None:
        """Run the loop on the calling thread until shutdown. Call it on the thread that
        loaded the model: a second thread running torch ops starts a second OpenMP team,
        and with more OpenMP threads than cores libgomp stops spinning between parallel
        regions (decode at 35 instead of 45 tokens/s on 2 cores, measured)."""
        self._thread = threading.current_thread()
        self._running.set()
        self._run()

    def wait_running(self) -> None:
        """Until ``run_here`` has started on some thread."""
        self._running.wait()

    @property
    def ready(self) -> bool:
        return (self.failure is None and self._thread is not None and self._thread.is_alive()
                and not self._stop.is_set())

    def submit(self, request: CompletionRequest,
               prompt_ids: Sequence[Sequence[int]]) -> RequestHandle:
        """Queue a request. Seeds are drawn here, on rank 0, so a seedless request still
        samples the same on every rank and can be replayed from its logged seed."""
        if not self.ready:
            raise EngineError(503, f"the server is not ready: {self.failure or 'stopping'}",
                              code="not_ready")
        request = dataclasses.replace(request, sampling=request.sampling.seeded())
        stop = request.sampling.stop
        stop_ids = self.tokenizer.single_token_ids(stop) if stop else ()
        handle = RequestHandle(request, prompt_ids, stop_ids, self.request_timeout_s,
                               clock=self.clock)
        self._inbox.put(Submit(handle))
        if not self.ready:  # failed after the check above: fail() may have drained already
            reason = self.failure or "stopping"
            handle.fail(EngineError(503, f"the server is not ready: {reason}", code="not_ready"))
        handle.wait_accepted(self.request_timeout_s)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The client is gone: free the request's KV cache (no-op when it already finished)."""
        if not handle.done:
            self._inbox.put(Cancel(handle))

    def fail(self, reason: str, expected: bool = False) -> None:
        """Fatal: not ready from now on, and every pending request gets a 503. Safe to call
        from a supervisor thread while the loop is stuck in a collective."""
        if self.failure is None:
            self.failure = reason
            if not expected:
                log.error("engine failed: %s", reason)
        error = EngineError(503, f"the server failed and is shutting down: {reason}",
                            code="server_failed")
        for handle in list(self._handles.values()):
            handle.fail(error)
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if not isinstance(message, Wake):
                message.handle.fail(error)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; it tells the worker ranks to exit."""
        self._stop.set()
        self._inbox.put(Wake())
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop.is_set() and self.failure is None:
                    self._drain(block=self.scheduler.idle)
                    self._expire()
                    if not self.scheduler.idle:
                        self._step()
            if self.failure is None:
                self.control.send_shutdown()
        except BaseException as e:  # noqa: BLE001 - anything here leaves the ranks out of step
            log.exception("engine loop stopped")
            self.fail(f"{type(e).__name__}: {e}")
        finally:
            self.fail(self.failure or "the server is stopping", expected=True)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.ping_interval_s) if block else \
                self._inbox.get_nowait()
        except queue.Empty:
            if block and self.clock() - self._last_ping >= self.ping_interval_s:
                self._collective(self.control.ping)
                self._last_ping = self.clock()
            return
        while True:
            if isinstance(item, Submit):
                self._accept(item.handle)
            elif isinstance(item, Cancel):
                self._drop(item.handle, None)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _collective(self, fn, *args):
        self.busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.busy_since = None

    def _accept(self, handle: RequestHandle) -> None:
        req = handle.request
        try:
            seqs = self.scheduler.submit(handle.prompt_ids, req.sampling,
                                         stop_ids=handle.stop_ids, stream=req.stream)
        except Exception as e:  # QueueFull -> 429, RequestError -> 400
            handle.reject(e)
            return
        self._handles[seqs[0].group] = handle
        self.stats.prompt_tokens += sum(len(s.prompt) for s in seqs)
        handle.accept(seqs)
        # Admit now, so "waiting" (and its 429 bound) counts only requests the KV cache has
        # no room for, not a burst the loop has not looked at yet.
        self.scheduler.admit()
        self._update_stats()

    def _drop(self, handle: RequestHandle, error: EngineError | None) -> None:
        if handle.seqs:
            self.scheduler.cancel(handle.seqs[0].group)
            self._handles.pop(handle.seqs[0].group, None)
        self._update_stats()  # before the client hears of it: /metrics is never behind
        handle.fail(error or EngineError(499, "the client went away", code="cancelled"))

    def _expire(self) -> None:
        now = self.clock()
        for handle in [h for h in self._handles.values() if now > h.deadline]:
            log.warning("request %s timed out after %.1f s", handle.id, self.request_timeout_s)
            self._drop(handle, timeout_error(self.request_timeout_s))

    def _forward(self, work: StepWork):
        started = time.perf_counter()
        self._collective(self.control.send_step, work)
        out = self._collective(self.runner.run, work)
        self.stats.forward_seconds += time.perf_counter() - started
        return out

    def _step(self) -> None:
        plan = self.stepper.plan()
        self._update_stats()
        if not plan.rows:
            return
        try:
            events = self.stepper.step(plan)
        except StepFailed as e:
            if self.control.world_size > 1 and e.in_forward:
                raise  # the other ranks may be waiting inside the forward: fatal
            self._fail_batch(e)
            return
        now = self.clock()
        for row in plan.rows:  # time to first token, for /metrics
            handle = self._handles.get(row.seq.group)
            if handle is not None and row.seq.generated and handle.first_token_at is None:
                handle.first_token_at = now
        self._update_stats()  # before the clients hear of it: /metrics is never behind
        for event in events:
            self._route(event)

    def _route(self, event: Event) -> None:
        handle = self._handles.get(event.seq.group)
        if handle is None:  # its request failed earlier in this step's events
            return
        if event.error is not None:
            self._drop(handle, event.error)
            return
        if handle.done:
            return
        if event.delta is not None:
            handle.post(event.delta)
        if event.result is not None and handle.finish_seq(event.seq.index, event.result):
            self._handles.pop(event.seq.group, None)

    def _update_stats(self) -> None:
        s, pool = self.stats, self.scheduler.pool
        s.queued_requests = self.scheduler.queued_requests
        s.running_sequences = len(self.scheduler.running)
        s.kv_blocks_used, s.kv_blocks_total = pool.used, pool.num_blocks
        s.prefix_queried_tokens, s.prefix_hit_tokens = pool.queried_tokens, pool.hit_tokens
        s.preemptions = self.scheduler.preempted
        step = self.stepper
        s.steps, s.tokens_generated = step.steps, step.tokens_generated
        s.prompt_tokens_computed = step.prompt_tokens_computed

    def _fail_batch(self, failed: StepFailed) -> None:
        plan, exc = failed.plan, failed.error
        # CUDA raises OutOfMemoryError; torch's CPU allocator a RuntimeError with ENOMEM.
        oom = isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)
        log.error("a batch of %d rows failed: %s: %s", len(plan.rows), type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__) if not oom else False)
        if oom:
            error = EngineError(503, "out of memory while generating this batch; retry, or "
                                "send fewer or shorter prompts", code="out_of_memory")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            error = EngineError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                code="generation_failed")
        self.stats.batches_failed += 1
        for group in dict.fromkeys(row.seq.group for row in plan.rows):
            if group in self._handles:
                self._drop(self._handles[group], error)
