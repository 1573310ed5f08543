"""The OPT generation engine on rank 0: the loop (``loop.Loop``) over the paged scheduler.

Callers (HTTP threads, ``LLM.generate``) call ``submit`` (which returns a ``RequestHandle``
once the loop has queued the request, or raises QueueFull / RequestError) and ``cancel``;
everything else happens on the loop thread, so the scheduler needs no lock. A step is one
``decoding.step`` (plan, send the step's work to the other ranks, forward, sample, stop) whose
events go to the handles, found by the sequences' request group.

Failures: with one rank, an exception while running a batch fails only the requests in that
batch (503 for out-of-memory, else 500) and the loop goes on. With several ranks a failed
forward may have left the others inside a collective, so it is fatal: the engine marks itself
failed, answers every pending request with 503, and the process supervisor (``serve``) exits.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from opt_serving.decoding.scheduler import Scheduler
from opt_serving.decoding.step import Event, StepFailed, Stepper
from opt_serving.decoding.work import StepWork
from opt_serving.protocol import CompletionRequest
from opt_serving.tokenizer import TextTokenizer

from .handles import RequestHandle
from .loop import Loop
from .ranks import Control
from .runner import StepRunner


class Engine(Loop):
    """OPT's continuous batching over the paged KV cache, on one rank or several."""

    def __init__(self, *, runner: StepRunner, control: Control, scheduler: Scheduler,
                 tokenizer: TextTokenizer, request_timeout_s: float, ping_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(control=control, request_timeout_s=request_timeout_s,
                         ping_interval_s=ping_interval_s, clock=clock)
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.stepper = Stepper(scheduler, self._forward, tokenizer.token_bytes)

    def submit(self, request: CompletionRequest,
               prompt_ids: Sequence[Sequence[int]]) -> RequestHandle:
        """Queue a request. Seeds are drawn here, on rank 0, so a seedless request still
        samples the same on every rank and can be replayed from its logged seed."""
        request = dataclasses.replace(request, sampling=request.sampling.seeded())
        stop = request.sampling.stop
        stop_ids = self.tokenizer.single_token_ids(stop) if stop else ()
        handle = RequestHandle(request, prompt_ids, stop_ids, self.request_timeout_s,
                               clock=self.clock)
        return self._enqueue(handle)

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

    def _release(self, handle: RequestHandle) -> None:
        if handle.seqs:
            self.scheduler.cancel(handle.seqs[0].group)

    def _idle(self) -> bool:
        return self.scheduler.idle

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
        plan = failed.plan
        error = self._batch_error(failed.error, len(plan.rows))
        for group in dict.fromkeys(row.seq.group for row in plan.rows):
            if group in self._handles:
                self._drop(self._handles[group], error)
