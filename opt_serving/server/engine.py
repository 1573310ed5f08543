"""The generation engine on rank 0: one loop thread that owns the scheduler and runs the steps.

HTTP threads call ``submit`` (which returns a ``RequestHandle`` once the loop has queued the
request, or raises QueueFull / RequestError) and ``cancel``; everything else happens on the
loop thread, so the scheduler needs no lock. Each iteration: take new requests and
cancellations, expire requests past their deadline, admit, plan, send the step's work to the
other ranks, run the forwards, sample the ``last`` rows with each row's own options and RNG,
commit, and check stop criteria (step function in the style of early TGI's generate_token).

Failures: with one rank, an exception while running a batch fails only the requests in that
batch (503 for out-of-memory, else 500) and the loop goes on. With several ranks a failed
forward may have left the others inside a collective, so it is fatal: the engine marks itself
failed, answers every pending request with 503, and the process supervisor (``serve``) exits.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from opt_serving.config import EOS_ID
from opt_serving.tokenizer import TextTokenizer
from opt_serving.sampling import (RowParams, gather_logprobs, log_probs, make_generator,
                                  next_tokens, source_tokens, top_logprobs)
from opt_serving.stopping import StopCriteria, StopStatus, releasable

from .handles import EngineError, RequestHandle, SeqState, timeout_error
from .scheduler import RUNNING, Scheduler, Seq, StepPlan
from opt_serving.protocol import CompletionRequest
from .ranks import Control, LogitIndex, ModelRunner, build_work

log = logging.getLogger("opt_serve.engine")


@dataclass
class EngineStats:
    """Counters the loop updates and /metrics reads (plain ints: one writer)."""

    queued_requests: int = 0
    running_sequences: int = 0
    tokens_generated: int = 0
    steps: int = 0
    batches_failed: int = 0
    forward_seconds: float = 0.0  # inside the model's forwards (this rank's view)


class Engine:
    def __init__(self, *, runner: ModelRunner, control: Control, scheduler: Scheduler,
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
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}  # scheduler group -> request
        self._stop = threading.Event()
        self._last_ping = clock()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- any thread --------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self.failure is None and self._thread.is_alive() and not self._stop.is_set()

    def submit(self, request: CompletionRequest,
               prompt_ids: Sequence[Sequence[int]]) -> RequestHandle:
        """Queue a request. Seeds are drawn here, on rank 0, so a seedless request still
        samples the same on every rank and can be replayed from its logged seed."""
        if not self.ready:
            raise EngineError(503, f"the server is not ready: {self.failure or 'stopping'}",
                              code="not_ready")
        request = dataclasses.replace(request, sampling=request.sampling.seeded())
        stop_ids = self.tokenizer.single_token_ids(request.stop) if request.stop else ()
        handle = RequestHandle(request, prompt_ids, stop_ids, self.request_timeout_s,
                               clock=self.clock)
        self._inbox.put(("submit", handle))
        if not self.ready:  # failed after the check above: fail() may have drained already
            reason = self.failure or "stopping"
            handle.fail(EngineError(503, f"the server is not ready: {reason}", code="not_ready"))
        handle.wait_accepted(self.request_timeout_s)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The client is gone: free the request's slots (no-op when it already finished)."""
        if not handle.done:
            self._inbox.put(("cancel", handle))

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
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if handle is not None:
                handle.fail(error)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; it tells the worker ranks to exit."""
        self._stop.set()
        self._inbox.put(("wake", None))
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
            kind, handle = item
            if kind == "submit":
                self._accept(handle)
            elif kind == "cancel":
                self._drop(handle, None)
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
        params = req.sampling
        criteria = StopCriteria.build(req.max_tokens, req.stop, params.min_tokens)
        prompts, states = [], []
        for p, ids in enumerate(handle.prompt_ids):
            for i in range(req.best_of):
                prompts.append(ids)
                states.append(SeqState(
                    handle=handle, prompt_index=p, copy=i, params=params,
                    generator=make_generator(params.seed, p * req.best_of + i),
                    criteria=criteria, stop_ids=handle.stop_ids, source=(), echo=req.echo,
                    top_k=req.top_k_logprobs))
        try:
            seqs = self.scheduler.submit(prompts, req.max_tokens, states)
        except Exception as e:  # QueueFull -> 429, RequestError -> 400
            handle.reject(e)
            return
        for seq in seqs:
            seq.payload.source = source_tokens(seq.prompt[1:], params.alpha_src_penalty_end_idx,
                                               seq.truncated)
        self._handles[seqs[0].group] = handle
        handle.accept(seqs)
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

    def _step(self) -> None:
        self.scheduler.admit()
        plan = self.scheduler.step_plan()
        self._update_stats()
        if not plan.rows:
            return
        work, index = build_work(plan, lambda seq: seq.payload.echo)
        started = time.perf_counter()
        try:
            self._collective(self.control.send_step, work)
            prefill, decode = self._collective(self.runner.run, work)
        except Exception as e:
            if self.control.world_size > 1:
                raise  # the other ranks may be waiting inside the forward: fatal
            self._fail_batch(plan, e)
            return
        self.stats.forward_seconds += time.perf_counter() - started
        try:
            self._sample(plan, index, prefill, decode)
        except Exception as e:  # rank 0 only: the ranks are still in step
            self._fail_batch(plan, e)
        self.stats.steps += 1
        self._update_stats()

    def _update_stats(self) -> None:
        self.stats.queued_requests = self.scheduler.queued_requests
        self.stats.running_sequences = len(self.scheduler.running)

    def _fail_batch(self, plan: StepPlan, exc: Exception) -> None:
        # CUDA raises OutOfMemoryError; torch's CPU allocator a RuntimeError with ENOMEM.
        oom = isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)
        log.error("a batch of %d rows failed: %s: %s", len(plan.rows), type(exc).__name__, exc,
                  exc_info=not oom)
        if oom:
            error = EngineError(503, "out of memory while generating this batch; retry, or "
                                "send fewer or shorter prompts", code="out_of_memory")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            error = EngineError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                code="generation_failed")
        self.stats.batches_failed += 1
        handles = {row.seq.group: row.seq.payload.handle for row in plan.rows}
        for handle in handles.values():
            self._drop(handle, error)

    def _echo_scores(self, seq: Seq, start: int, logits: torch.Tensor) -> None:
        """Teacher-forced log-probs of the prompt: position start + j scores prompt token
        start + j + 1.  logits: (n, V) for the chunk's positions."""
        st = seq.payload
        n = min(logits.shape[0], len(seq.prompt) - 1 - start)
        if n <= 0:
            return
        lp = log_probs(logits[:n])  # (n, V)
        targets = torch.tensor(seq.prompt[start + 1:start + 1 + n], device=lp.device)
        st.prompt_logprobs += gather_logprobs(lp, targets).tolist()
        if st.top_k:
            values, ids = top_logprobs(lp, st.top_k)
            st.prompt_tops += [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def _sample(self, plan: StepPlan, index: LogitIndex, prefill: torch.Tensor | None,
                decode: torch.Tensor | None) -> None:
        last = []  # (seq, logits (V,)) of every row that reached its newest token
        for i, row in enumerate(plan.prefill):
            if row.seq.payload.echo:
                self._echo_scores(row.seq, row.start, prefill[i, :index.prefill_positions[i]])
            if row.last:
                last.append((row.seq, prefill[i, index.prefill_last[i]]))
        last += [(row.seq, decode[j]) for j, row in enumerate(plan.decode)]
        drawing = [(s, lg) for s, lg in last if s.max_tokens > 0]
        sampled, scores, tops = {}, {}, {}
        if drawing:
            # Greedy rows draw nothing: only sampling rows need their RNG state kept.
            rng = [None if s.payload.params.greedy else s.payload.generator.get_state()
                   for s, _ in drawing]
            try:
                drawn = self._draw(drawing)
            except Exception:  # noqa: BLE001 - find the row that raised: each alone, from
                drawn = {}     # the same RNG state, so the others draw what they would have
                for (seq, lg), state in zip(drawing, rng):
                    if state is not None:
                        seq.payload.generator.set_state(state)
                    try:
                        drawn.update(self._draw([(seq, lg)]))
                    except Exception as e:  # noqa: BLE001
                        drawn[seq.id] = e
            for seq, _ in drawing:
                got = drawn[seq.id]
                if isinstance(got, Exception):
                    if seq.payload.handle.done:
                        continue
                    # Only this request fails; the rest of the batch goes on.
                    log.error("request %s failed while sampling: %s", seq.payload.handle.id, got)
                    self._drop(seq.payload.handle, EngineError(
                        500, f"generation failed for this request: {got}",
                        code="generation_failed"))
                else:
                    sampled[seq.id], scores[seq.id], tops[seq.id] = got
        self.scheduler.commit(plan, sampled)
        now = self.clock()
        for seq, _ in last:
            if seq.state != RUNNING:
                continue
            if seq.max_tokens == 0:  # scoring only (echo): nothing to draw
                self._finish(seq, StopStatus(True, "length", 0, 0))
                continue
            st, token = seq.payload, sampled[seq.id]
            if st.handle.first_token_at is None:
                st.handle.first_token_at = now
            eos = token == EOS_ID
            status = st.add(token, b"" if eos else self.tokenizer.token_bytes(token),
                            scores[seq.id], tops[seq.id], eos)
            self.stats.tokens_generated += 1
            if status.stop:
                self._finish(seq, status)
            elif st.handle.request.stream:
                upto = releasable(st.text, st.criteria.stop)
                delta = st.delta(seq.generated, upto, bisect.bisect_right(st.ends, upto), None)
                if delta is not None:
                    st.handle.post(delta)

    def _draw(self, drawing: list) -> dict:
        """seq.id -> (token, its log-prob, top alternatives or None) for rows (seq, logits
        (V,)); a row whose processed scores are NaN (no distribution to draw from) gets a
        ValueError instead, so that it alone fails."""
        seqs = [s for s, _ in drawing]
        states = [s.payload for s in seqs]
        logits = torch.stack([lg for _, lg in drawing])  # (N, V)
        rp = RowParams.stack([st.params for st in states], device=logits.device)
        tokens, lps = next_tokens(
            logits, rp, generated=[s.generated for s in seqs],
            sources=[st.source for st in states], stop_ids=[st.stop_ids for st in states],
            generators=[st.generator for st in states])
        broken = torch.isnan(lps).any(dim=-1).tolist()  # (N,)
        chosen = gather_logprobs(lps, tokens).tolist()
        k = max(st.top_k for st in states)
        if k:
            values, ids = top_logprobs(lps, k)
            values, ids = values.tolist(), ids.tolist()
        out = {}
        for j, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            if broken[j]:
                out[seq.id] = ValueError("the model's scores for it are not finite numbers "
                                         "(NaN or infinity)")
                continue
            top = list(zip(ids[j], values[j]))[:seq.payload.top_k] if seq.payload.top_k else None
            out[seq.id] = (token, chosen[j], top)
        return out

    def _finish(self, seq: Seq, status: StopStatus) -> None:
        st, handle = seq.payload, seq.payload.handle
        self.scheduler.finish(seq)
        self._update_stats()  # before the client hears of it: /metrics is never behind
        if handle.request.stream:
            handle.post(st.delta(seq.generated, status.keep_bytes, status.keep_tokens,
                                 status.finish_reason or "length"))
        if handle.finish_seq(st.index, st.result(seq.prompt, seq.truncated, seq.generated,
                                                 status)):
            self._handles.pop(seq.group, None)
