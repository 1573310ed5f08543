"""The engine loop on rank 0: one thread that owns a batching core and runs its steps.

Callers (HTTP threads, ``LLM.generate``) hand it ``RequestHandle``s through an inbox and block on
the handles; everything else happens on the loop thread, so the core needs no lock. Each
iteration: take new requests and cancellations, expire requests past their deadline, then one
step. ``Loop`` is that machinery; what a step is belongs to the subclass: ``engine.Engine``
(OPT: the paged scheduler, several ranks) or ``beams.BeamLoop`` (beam groups).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from opt_serving.protocol import EngineError, timeout_error

from .handles import RequestHandle
from .ranks import Control

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


class Loop:
    """The loop thread, the inbox, deadlines and failure. Subclasses give ``_idle``,
    ``_accept``, ``_release`` (free a request's place in the core) and ``_step``."""

    def __init__(self, *, control: Control, request_timeout_s: float,
                 ping_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.control = control
        # Request deadlines and pings follow ``clock`` (tests drive it); the collective
        # watchdog (busy_since) always reads the real monotonic clock.
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self.ping_interval_s = ping_interval_s
        self.stats = EngineStats()
        self.failure: str | None = None  # set once: the engine serves nothing after it
        self.busy_since: float | None = None  # when the current collective began (watchdog)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._handles: dict[Hashable, RequestHandle] = {}  # core's group -> its request
        self._stop = threading.Event()
        self._last_ping = clock()
        self._thread: threading.Thread | None = None  # the loop's, once it runs
        self._running = threading.Event()  # set when it does: ``wait_running``

    # -- the subclass's ------------------------------------------------------------------------

    def _idle(self) -> bool:
        raise NotImplementedError

    def _accept(self, handle: RequestHandle) -> None:
        raise NotImplementedError

    def _release(self, handle: RequestHandle) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _update_stats(self) -> None:
        pass

    # -- any thread --------------------------------------------------------------------------

    def start(self) -> "Loop":
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

    def _enqueue(self, handle: RequestHandle) -> RequestHandle:
        """Hand ``handle`` to the loop; returns once it was accepted (or raises why not)."""
        if not self.ready:
            raise EngineError(503, f"the server is not ready: {self.failure or 'stopping'}",
                              code="not_ready")
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
        for handle in dict.fromkeys(self._handles.values()):  # a request may hold several
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
                    self._drain(block=self._idle())
                    self._expire()
                    if not self._idle():
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

    def _drop(self, handle: RequestHandle, error: EngineError | None) -> None:
        self._release(handle)
        for key in [k for k, h in self._handles.items() if h is handle]:
            del self._handles[key]
        self._update_stats()  # before the client hears of it: /metrics is never behind
        handle.fail(error or EngineError(499, "the client went away", code="cancelled"))

    def _expire(self) -> None:
        now = self.clock()
        for handle in [h for h in dict.fromkeys(self._handles.values()) if now > h.deadline]:
            log.warning("request %s timed out after %.1f s", handle.id, self.request_timeout_s)
            self._drop(handle, timeout_error(self.request_timeout_s))

    def _batch_error(self, exc: Exception, rows: int) -> EngineError:
        """What the requests of a batch that raised are told (logged, and counted)."""
        # CUDA raises OutOfMemoryError; torch's CPU allocator a RuntimeError with ENOMEM.
        oom = isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)
        log.error("a batch of %d rows failed: %s: %s", rows, type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__) if not oom else False)
        self.stats.batches_failed += 1
        if oom:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return EngineError(503, "out of memory while generating this batch; retry, or "
                               "send fewer or shorter prompts", code="out_of_memory")
        return EngineError(500, f"generation failed: {type(exc).__name__}: {exc}",
                           code="generation_failed")


def start_loaded(build: Callable[[], tuple[Loop, Any]],
                 check: Callable[[], None] = lambda: None) -> tuple[Loop, Any]:
    """``build()`` (load a model, make its loop) on a new thread that then runs the loop, so
    that loading and every step's torch ops share one thread (``Loop.run_here`` says why).
    Returns what ``build`` returned once the loop runs; raises what it raised; ``check`` is
    called while waiting and may raise (a worker that died)."""
    box: dict = {}
    built = threading.Event()

    def loader() -> None:
        try:
            box["built"] = build()
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = e
            return
        finally:
            built.set()
        box["built"][0].run_here()

    threading.Thread(target=loader, name="engine-loop", daemon=True).start()
    while not built.wait(0.2):
        check()
    if "error" in box:
        raise box["error"]
    box["built"][0].wait_running()
    return box["built"]
