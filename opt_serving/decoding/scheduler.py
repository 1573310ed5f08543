"""The continuous-batching policy: which sequences run at each decoding step.

A plain data structure, no threads and no model: the engine loop (which owns it) calls
``admit()`` and ``step_plan()``, runs the model on the plan, ``commit()``s the tokens it
sampled and ``finish()``es the sequences that stopped. Sequences join and leave the running
batch at every step (iteration-level batching, as TGI and vLLM).

Memory: every running sequence owns one KV-cache slot (a row of ``slot_len`` positions) and
reserves its prompt plus ``max_tokens`` up front against a token budget, so a running sequence
can never run out of cache; admission waits (first come, first served) when no slot or budget
is free. Long prompts are prefilled in chunks of at most ``step_tokens`` per step so decoding
rows keep moving while a long prompt arrives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from opt_serving.config import EOS_ID
from opt_serving.protocol import RequestError, SamplingParams

from .sequence import FINISHED, RUNNING, WAITING, Seq


class QueueFull(Exception):
    """Too many requests waiting for admission: the HTTP layer answers 429 at once."""


@dataclass(frozen=True)
class Row:
    """One batch row of a step: feed ``tokens`` into ``slot`` at positions start.."""

    seq: Seq
    slot: int
    start: int
    tokens: tuple[int, ...]
    last: bool  # the chunk reaches the newest known token: its last logits pick the next one


@dataclass(frozen=True)
class StepPlan:
    """One step's work. Prefill rows are chunks of prompts: right-padded to the longest one,
    every row still fits its slot. Decode rows feed one token each. Run them as two forwards
    ((Bp, T) and (Bd, 1)) or pad them into one."""

    prefill: tuple[Row, ...]
    decode: tuple[Row, ...]

    @property
    def rows(self) -> tuple[Row, ...]:
        return self.prefill + self.decode


def fit_prompt(prompt: Sequence[int], max_tokens: int,
               context_len: int) -> tuple[tuple[int, ...], int]:
    """metaseq's rule: keep the last ``context_len - max_tokens - 1`` prompt tokens (the 1 is
    the leading </s>). Returns (kept, number dropped)."""
    keep = context_len - max_tokens - 1
    if keep < 1:
        raise RequestError(f"max_tokens {max_tokens} leaves no room for a prompt: this server "
                           f"holds {context_len} tokens per sequence", "max_tokens")
    dropped = max(0, len(prompt) - keep)
    return tuple(prompt[dropped:]), dropped


class Scheduler:
    """Not thread-safe: one engine loop owns it; HTTP threads hand it work through the loop."""

    def __init__(self, *, num_slots: int, slot_len: int, max_queued: int, step_tokens: int,
                 kv_budget: int | None = None, max_seq_len: int = 2048, bos_id: int = EOS_ID):
        if min(num_slots, slot_len, max_queued, step_tokens) < 1:
            raise ValueError("num_slots, slot_len, max_queued and step_tokens must be >= 1")
        self.num_slots, self.slot_len = num_slots, slot_len
        self.max_queued, self.step_tokens = max_queued, step_tokens
        self.kv_budget = num_slots * slot_len if kv_budget is None else kv_budget
        # The longest sequence that can ever be admitted.
        self.context_len = min(max_seq_len, slot_len, self.kv_budget)
        self.bos_id = bos_id
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []  # in admission order
        self._free = list(range(num_slots))
        self._ids = itertools.count()
        self._groups = itertools.count()

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def queued_requests(self) -> int:
        return len({s.group for s in self.waiting})

    @property
    def reserved_tokens(self) -> int:
        return sum(s.reserve for s in self.running)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- transitions ---------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], options: SamplingParams, *,
               owner: Any = None, stop_ids: tuple[int, ...] = (),
               stream: bool = False) -> tuple[Seq, ...]:
        """Queue one request: ``options.best_of`` sequences per prompt, prompt by prompt.
        Raises QueueFull (429) or RequestError (400) and then queues nothing."""
        if self.queued_requests >= self.max_queued:
            raise QueueFull(f"{self.queued_requests} requests are already waiting; "
                            f"try again later")
        fitted = [fit_prompt(p, options.max_tokens, self.context_len) for p in prompts]
        group = next(self._groups)
        seqs = tuple(Seq(id=next(self._ids), group=group, prompt=(self.bos_id, *kept),
                         options=options, prompt_index=p, copy=i, truncated=dropped,
                         stop_ids=stop_ids, stream=stream, owner=owner)
                     for p, (kept, dropped) in enumerate(fitted)
                     for i in range(options.best_of))
        self.waiting.extend(seqs)
        return seqs

    def admit(self) -> list[Seq]:
        """Move waiting sequences into the running batch, oldest first, while a slot and the
        token budget allow. The oldest one that does not fit blocks the rest, so a long
        request is not starved by a stream of short ones."""
        admitted = []
        reserved = self.reserved_tokens
        while self.waiting and self._free:
            seq = self.waiting[0]
            if reserved + seq.reserve > self.kv_budget:
                break
            self.waiting.pop(0)
            seq.slot, seq.state = self._free.pop(0), RUNNING
            reserved += seq.reserve
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def step_plan(self) -> StepPlan:
        """This step's rows: a chunk of every prefilling sequence while ``step_tokens`` lasts
        (oldest first), and one token for each sequence that has a newly sampled one."""
        prefilling = [s for s in self.running if s.prefilling]
        # Prefill rows are padded to the longest chunk: no chunk may exceed any row's room.
        room = min((self.slot_len - s.cached for s in prefilling), default=0)
        budget, prefill = self.step_tokens, []
        for s in prefilling:
            if budget <= 0:
                break
            n = min(len(s.prompt) - s.cached, budget, room)
            end = s.cached + n
            prefill.append(Row(s, s.slot, s.cached, s.prompt[s.cached:end],
                               last=end == len(s.prompt)))
            budget -= n
        decode = tuple(Row(s, s.slot, s.cached, (s.generated[-1],), last=True)
                       for s in self.running
                       if not s.prefilling and s.cached < len(s.prompt) + len(s.generated))
        return StepPlan(tuple(prefill), decode)

    def commit(self, plan: StepPlan, sampled: Mapping[int, int]) -> None:
        """Record a step: the rows' tokens are in the cache now, and ``sampled[seq.id]`` is the
        token drawn for each ``last`` row (absent when the engine stops the sequence without
        drawing, e.g. max_tokens 0; it must then finish it)."""
        for row in plan.rows:
            seq = row.seq
            if seq.state != RUNNING:
                continue  # cancelled while the step ran
            seq.cached = row.start + len(row.tokens)
            if row.last and seq.id in sampled:
                seq.generated.append(sampled[seq.id])

    def finish(self, seq: Seq) -> None:
        """Release a sequence's slot and reservation (or take it out of the queue)."""
        if seq.state == RUNNING:
            self.running.remove(seq)
            self._free.append(seq.slot)
            self._free.sort()
        elif seq.state == WAITING:
            self.waiting.remove(seq)
        seq.state = FINISHED

    def cancel(self, group: int) -> list[Seq]:
        """Drop every unfinished sequence of a request (timeout, client gone)."""
        seqs = [s for s in self.waiting + self.running if s.group == group]
        for seq in seqs:
            self.finish(seq)
        return seqs
