"""BlenderBot 1 behind the engine loop: ``BeamLoop`` runs a ``blenderbot.engine.BeamEngine``
on the same loop machinery as OPT's engine (``loop.Loop``: inbox, deadlines, cancellation,
failure, /metrics counters), so opt-serve's HTTP layer drives either.

A request is one group per prompt; its handle completes when every group has finished, with
each group's n-best list as its result. A step that raises fails the requests it was running
(503 out of memory, else 500) and the loop goes on.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from opt_serving.blenderbot.engine import BeamEngine
from opt_serving.blenderbot.search import SearchOptions

from .handles import RequestHandle
from .loop import Loop
from .ranks import Control


class BeamLoop(Loop):
    """``submit(contexts, options)`` from any thread; ``handle.result()`` is one n-best list
    (``search.Hypothesis``, best first) per context."""

    def __init__(self, core: BeamEngine, *, request_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(control=Control(1, request_timeout_s), request_timeout_s=request_timeout_s,
                         clock=clock)
        self.core = core
        self.stats.kv_blocks_total = core.batch.groups  # group slots, for /metrics

    def submit(self, contexts: Sequence[Sequence[int]], options: SearchOptions) -> RequestHandle:
        handle = RequestHandle(options, contexts, (), self.request_timeout_s, clock=self.clock)
        return self._enqueue(handle)

    def _idle(self) -> bool:
        return self.core.idle

    def _accept(self, handle: RequestHandle) -> None:
        try:
            groups = self.core.submit_all(handle.prompt_ids, handle.request)
        except Exception as e:  # QueueFull -> 429, RequestError -> 400
            handle.reject(e)
            return
        for g in groups:
            self._handles[g.id] = handle
        self.stats.prompt_tokens += sum(len(c) for c in handle.prompt_ids)
        handle.accept(groups)
        self._update_stats()

    def _release(self, handle: RequestHandle) -> None:
        for group in handle.seqs:
            self.core.cancel(group)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            done = self.core.step()
        except Exception as e:  # noqa: BLE001 - the requests it ran fail, the loop goes on
            error = self._batch_error(e, sum(g.options.width for g in self.core.running))
            for handle in dict.fromkeys(self._handles[g.id] for g in self.core.running
                                        if g.id in self._handles):
                self._drop(handle, error)
            return
        self.stats.forward_seconds += time.perf_counter() - started
        self.stats.tokens_generated += sum(g.options.width for g in self.core.running) + \
            sum(g.options.width for g in done)
        self._update_stats()  # before the clients hear of it: /metrics is never behind
        now = self.clock()
        for group in done:
            handle = self._handles.pop(group.id, None)
            if handle is None or handle.done:
                continue
            handle.first_token_at = handle.first_token_at or now
            handle.finish_seq(handle.seqs.index(group), group.results)

    def _update_stats(self) -> None:
        s, core = self.stats, self.core
        s.queued_requests = len(core.waiting)
        s.running_sequences = sum(g.options.width for g in core.running)
        s.kv_blocks_used = len(core.running)
        s.steps = core.steps
