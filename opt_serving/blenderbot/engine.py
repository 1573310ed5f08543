"""Continuous batching of BlenderBot requests: each request is a group of k beam rows that owns
its ParlAI search state (``search.BeamState``); groups join and leave the batch at every step.

A plain, thread-free policy like ``decoding.scheduler``: ``submit`` queues a request (or
refuses it with a clear error), ``step`` admits what fits (encoding the newcomers together),
runs one decoder step for every running group (``batch.BeamBatch``), advances each group's
search on its own rows' logits, reorders the beams' caches and returns the groups that
finished. A group is never preempted: admission takes a whole group slot, which holds its
worst case (k rows x ``max_tokens`` positions).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from opt_serving.decoding.scheduler import QueueFull
from opt_serving.protocol import RequestError

from .batch import BeamBatch, SharedBeamBatch
from .config import START_ID
from .model import BlenderbotModel
from .search import BeamState, Hypothesis, SearchOptions


@dataclass(eq=False)
class Group:
    """One request: its encoder input, its search, and where it sits in the batch."""

    id: int
    context: tuple[int, ...]
    options: SearchOptions
    state: BeamState = field(init=False)
    slot: int | None = None
    results: list[Hypothesis] | None = None  # the n-best list, best first, once done

    def __post_init__(self):
        self.state = BeamState(self.options, self.context)


class BeamEngine:
    """Runs BlenderBot requests on ``model``: at most ``max_groups`` at once, each with at most
    ``max_beams`` beams, ``max_tokens`` reply tokens and ``context`` encoder tokens.
    ``forking``: "share" (beams share keys through tables: ``batch.SharedBeamBatch``) or
    "copy" (ParlAI's reordering copies the histories: ``batch.BeamBatch``); sharing measured
    1.10x to 1.16x the replies/s of copying at 8 and 32 requests (90M and 400M shapes, CPU,
    32-token replies: ``scripts/bench_seq2seq.py``)."""

    def __init__(self, model: BlenderbotModel, *, max_groups: int = 32, max_beams: int = 10,
                 max_tokens: int = 128, context: int | None = None, max_queued: int = 1024,
                 forking: str = "share"):
        self.model = model
        self.context = min(context or model.cfg.max_positions, model.cfg.max_positions)
        self.max_tokens = min(max_tokens, model.cfg.max_positions)
        self.max_beams, self.max_queued = max_beams, max_queued
        layout = {"copy": BeamBatch, "share": SharedBeamBatch}[forking]
        self.batch = layout(model, groups=max_groups, beams=max_beams, steps=self.max_tokens,
                            context=self.context)
        self.waiting: deque[Group] = deque()
        self.running: list[Group] = []  # running[i].slot == i
        self.steps = 0
        # Time in the beams' cache reordering and in whole steps (host clock: on a GPU these
        # count launches, not the device's work): what a paged, forking cache would save.
        self.reorder_seconds = self.step_seconds = 0.0
        self._ids = itertools.count()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def check(self, context: Sequence[int], options: SearchOptions) -> None:
        """Raise RequestError (400) naming what does not fit this engine."""
        if not context:
            raise RequestError("the prompt is empty: send at least one token", "prompt")
        if len(context) > self.context:
            raise RequestError(f"the prompt has {len(context)} tokens; this model reads at "
                               f"most {self.context} (ParlAI truncates the history to "
                               f"text_truncate from the left first)", "prompt")
        bad = [t for t in context if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.model.cfg.vocab_size - 1})", "prompt")
        if options.width > self.max_beams:
            raise RequestError(f"beam_size {options.width} is more than this server's "
                               f"{self.max_beams}", "beam_size")
        if options.max_tokens > self.max_tokens:
            raise RequestError(f"max_tokens {options.max_tokens} is more than this model's "
                               f"{self.max_tokens}", "max_tokens")

    def submit(self, context: Sequence[int], options: SearchOptions) -> Group:
        return self.submit_all([context], options)[0]

    def submit_all(self, contexts: Sequence[Sequence[int]],
                   options: SearchOptions) -> tuple[Group, ...]:
        """Queue one request's contexts, all or none: RequestError (400) naming what does
        not fit, QueueFull (429) when the queue has no room for them all."""
        for context in contexts:
            self.check(context, options)
        if len(self.waiting) + len(contexts) > self.max_queued:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting; "
                            f"try again later")
        groups = tuple(Group(next(self._ids), tuple(c), options) for c in contexts)
        self.waiting.extend(groups)
        return groups

    def cancel(self, group: Group) -> None:
        if group in self.waiting:
            self.waiting.remove(group)
        elif group.slot is not None:
            self._leave(group)

    # -- one step ------------------------------------------------------------------------------

    def _admit(self) -> None:
        new = []
        while self.waiting and len(self.running) < self.batch.groups:
            group = self.waiting.popleft()
            group.slot = len(self.running)
            self.running.append(group)
            new.append(group)
        if new:
            self.batch.encode([g.slot for g in new], [list(g.context) for g in new])

    def step(self) -> list[Group]:
        """Admit, run one decoder step for every running group, advance their searches;
        returns the groups that finished (their ``results`` set)."""
        started = time.perf_counter()
        self._admit()
        if not self.running:
            return []
        kb = max(g.options.width for g in self.running)
        tokens = torch.full((len(self.running), kb), START_ID, dtype=torch.long)
        for i, g in enumerate(self.running):
            hyps = g.state.hyps
            tokens[i, :len(hyps)] = torch.tensor([h[-1] for h in hyps])
        positions = torch.tensor([g.state.steps for g in self.running])
        dev = self.batch.device
        logits = self.batch.step(tokens.to(dev), positions.to(dev)).float().cpu()
        self.steps += 1
        sources = torch.arange(kb).repeat(len(self.running), 1)  # (G, kb): padded rows stay
        done = []
        for i, g in enumerate(self.running):
            n = len(g.state.prefixes())
            g.state.advance(logits[i, :n])
            sources[i, :len(g.state.beams)] = torch.tensor(g.state.beams)
            if g.state.done:
                done.append(g)
        span = int(positions.max()) + 1
        reordering = time.perf_counter()
        self.batch.reorder(sources.to(dev), span)
        self.reorder_seconds += time.perf_counter() - reordering
        for g in done:
            g.results = g.state.results()
            self._leave(g)
        self.step_seconds += time.perf_counter() - started
        return done

    def _leave(self, group: Group) -> None:
        """Free the group's slot; the last running group moves into it."""
        slot, last = group.slot, self.running[-1]
        if last is not group:
            self.batch.move(last.slot, slot)
            last.slot = slot
            self.running[slot] = last
        self.running.pop()
        group.slot = None

    def run(self, contexts: Sequence[Sequence[int]],
            options: SearchOptions) -> list[list[Hypothesis]]:
        """Every context's n-best list (submitted together, batched as they fit)."""
        groups = self.submit_all(contexts, options)
        while not self.idle:
            self.step()
        return [g.results for g in groups]
