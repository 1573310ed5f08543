"""One request between a caller's thread and the engine loop, and how the caller waits.

A caller (an HTTP thread, or ``LLM.generate``) parses and tokenises a request, hands a
``RequestHandle`` to the engine loop and blocks on the handle: the loop accepts or rejects it
(429 / 400), then posts streaming deltas and finally the per-sequence results or an
``EngineError``. Turning results into answers (``protocol.Renderer``) happens back on the
caller's thread, off the loop.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Sequence

from opt_serving.decoding.sequence import Seq
from opt_serving.protocol import (CompletionRequest, Delta, EngineError, SeqResult,
                                  new_request_id, timeout_error)


_DONE = object()


class RequestHandle:
    """One request between an HTTP thread and the engine loop. The loop calls the engine-side
    methods; the HTTP thread calls ``wait_accepted``, ``result`` or ``stream``."""

    def __init__(self, request: CompletionRequest, prompt_ids: Sequence[Sequence[int]],
                 stop_ids: tuple[int, ...], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.id = new_request_id()
        self.created = int(time.time())
        self.request = request
        self.prompt_ids = [tuple(p) for p in prompt_ids]
        self.stop_ids = stop_ids
        self.timeout_s = timeout_s
        self._clock = clock  # the engine's: deadlines are in its time
        self.submitted = clock()
        self.deadline = self.submitted + timeout_s
        self.first_token_at: float | None = None
        self.seqs: tuple[Seq, ...] = ()  # the scheduler's, once accepted
        self.results: list[SeqResult | None] = []
        self.done = False  # set by the loop: finished, failed or cancelled
        self._accepted = threading.Event()
        self._rejection: Exception | None = None
        self._events: queue.Queue = queue.Queue()

    # -- engine side (the loop thread) -------------------------------------------------------

    def accept(self, seqs: tuple[Seq, ...]) -> None:
        self.seqs = seqs
        self.results = [None] * len(seqs)
        self._accepted.set()

    def reject(self, error: Exception) -> None:
        self.done = True
        self._rejection = error
        self._accepted.set()

    def post(self, delta: Delta) -> None:
        self._events.put(delta)

    def finish_seq(self, position: int, result: SeqResult) -> bool:
        """Store one sequence's result; True when the whole request is complete."""
        self.results[position] = result
        if all(r is not None for r in self.results):
            self.done = True
            self._events.put(_DONE)
            return True
        return False

    def fail(self, error: EngineError) -> None:
        if not self.done:
            self.done = True
            if not self._accepted.is_set():
                self.reject(error)
            self._events.put(error)

    # -- caller side (an HTTP thread) --------------------------------------------------------

    def wait_accepted(self, timeout: float) -> None:
        """Raises QueueFull / RequestError / EngineError when the loop refused the request."""
        if not self._accepted.wait(timeout):
            raise EngineError(503, "the engine did not take the request in time",
                              code="engine_unresponsive")
        if self._rejection is not None:
            raise self._rejection

    def _next(self, grace_s: float):
        # The loop answers 504 at the deadline; the grace covers a loop stuck in a long step.
        left = self.deadline - self._clock() + grace_s
        try:
            item = self._events.get(timeout=max(left, 0.0))
        except queue.Empty:
            raise timeout_error(self.timeout_s) from None
        if isinstance(item, EngineError):
            raise item
        return item

    def result(self, grace_s: float = 5.0) -> list[SeqResult]:
        while True:
            if self._next(grace_s) is _DONE:
                return list(self.results)

    def stream(self, grace_s: float = 5.0) -> Iterator[Delta]:
        while True:
            item = self._next(grace_s)
            if item is _DONE:
                return
            yield item

    @property
    def truncated_tokens(self) -> int:
        best_of = self.request.sampling.best_of
        return sum(s.truncated for s in self.seqs[::best_of]) if self.seqs else 0
