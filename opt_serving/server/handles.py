"""What the engine keeps per sequence and per request, and how an HTTP thread waits for it.

An HTTP thread parses and tokenises a request, hands a ``RequestHandle`` to the engine loop and
blocks on the handle: the loop accepts or rejects it (429 / 400), then posts streaming deltas
and finally the per-sequence results or an ``EngineError``. Turning results into response
choices (ranking best_of copies, decoding text) happens back in the HTTP thread, off the loop.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Sequence

from opt_serving.decoding.sampling import pick_best
from opt_serving.decoding.sequence import Delta, SeqResult
from opt_serving.protocol import (ChoiceResult, CompletionRequest, EngineError, build_choice,
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
        self.seqs: tuple = ()  # the scheduler's Seq objects, once accepted
        self.results: list[SeqResult | None] = []
        self.done = False  # set by the loop: finished, failed or cancelled
        self._accepted = threading.Event()
        self._rejection: Exception | None = None
        self._events: queue.Queue = queue.Queue()

    # -- engine side (the loop thread) -------------------------------------------------------

    def accept(self, seqs: tuple) -> None:
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


def chosen(request: CompletionRequest, results: Sequence[SeqResult]) -> list[SeqResult]:
    """The n results returned per prompt, in prompt order: the best of best_of copies by
    total log-prob (copy order when best_of == n, so that indices match a stream's)."""
    options = request.sampling
    by_prompt: dict[int, list[SeqResult]] = {}
    for r in results:
        by_prompt.setdefault(r.prompt_index, []).append(r)
    out = []
    for p in sorted(by_prompt):
        copies = sorted(by_prompt[p], key=lambda r: r.copy)
        order = (range(len(copies)) if options.best_of == options.n
                 else pick_best([c.total_logprob for c in copies], options.n))
        out += [copies[i] for i in order]
    return out


def choice(tok, request: CompletionRequest, r: SeqResult) -> ChoiceResult:
    return build_choice(
        tok, prompt=r.prompt, generated=r.generated, echo=request.sampling.echo,
        prompt_logprobs=r.prompt_logprobs, generated_logprobs=r.logprobs,
        prompt_top=r.prompt_tops, generated_top=r.tops, finish_reason=r.finish_reason,
        prompt_index=r.prompt_index, truncated=r.truncated, text_bytes=r.text_bytes)


def choices_for(tok, request: CompletionRequest,
                results: Sequence[SeqResult]) -> list[ChoiceResult]:
    return [choice(tok, request, r) for r in chosen(request, results)]
