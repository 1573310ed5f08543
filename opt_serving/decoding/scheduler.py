"""The continuous-batching policy: which sequences run at each decoding step.

A plain data structure, no threads and no model: the engine loop (which owns it) calls
``admit()`` and ``step_plan()``, runs the model on the plan, ``commit()``s the tokens it
sampled and ``finish()``es the sequences that stopped. Sequences join and leave the running
batch at every step (iteration-level batching, as TGI and vLLM), and every step is one
ragged forward: one token of each decoding sequence plus chunks of prompts while
``step_tokens`` lasts (vLLM's chunked prefill), so the weights are read once per step.

Memory is paged (``blocks.BlockPool``): a sequence holds blocks for the tokens it has. On
admission it takes what the prefix cache holds of its prompt and blocks for the rest; while
decoding it takes a block whenever it fills one. Admission waits (first come, first served)
until the pool has room for a prompt. When a decoding sequence needs a block and none is
left, the most recently admitted sequence is preempted by recompute: its blocks go back
(full ones stay in the prefix cache), it returns to the head of the queue with what it has
generated, and on readmission its tokens are fed again (mostly from the prefix cache). Its
output, options and RNG state are kept, so the result does not change.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

from opt_serving.config import EOS_ID
from opt_serving.protocol import RequestError, SamplingParams

from .blocks import BlockPool, chain_digests
from .sequence import FINISHED, RUNNING, WAITING, Seq


class QueueFull(Exception):
    """Too many requests waiting for admission: the HTTP layer answers 429 at once."""


class Row(NamedTuple):
    """One sequence's part of a step: feed ``tokens`` at positions start.. (its keys and
    values go into ``blocks``, the sequence's block table as of this step). A named tuple:
    a step makes one per running sequence, and a frozen dataclass costs 5x more to build."""

    seq: Seq
    start: int
    tokens: tuple[int, ...]
    blocks: tuple[int, ...]
    last: bool  # the chunk reaches the newest known token: its last logits pick the next one


@dataclass(frozen=True)
class StepPlan:
    """One step's rows, decoding sequences first, run as one ragged forward."""

    rows: tuple[Row, ...]


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
    """Not thread-safe: one engine loop owns it; HTTP threads hand it work through the loop.

    ``num_blocks`` x ``block_size``: the KV cache (--kv-tokens); ``max_seqs``: the most
    sequences running at once; ``max_queued``: requests waiting before 429s;
    ``step_tokens``: prompt tokens one step may prefill."""

    def __init__(self, *, num_blocks: int, block_size: int, max_seqs: int, max_queued: int,
                 step_tokens: int, max_seq_len: int = 2048, prefix_caching: bool = True,
                 bos_id: int = EOS_ID):
        if min(num_blocks, block_size, max_seqs, max_queued, step_tokens) < 1:
            raise ValueError("num_blocks, block_size, max_seqs, max_queued and step_tokens "
                             "must be >= 1")
        self.pool = BlockPool(num_blocks, block_size)
        self.max_seqs, self.max_queued, self.step_tokens = max_seqs, max_queued, step_tokens
        self.prefix_caching = prefix_caching
        # The longest sequence that can ever be admitted.
        self.context_len = min(max_seq_len, num_blocks * block_size)
        self.bos_id = bos_id
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []  # in admission order
        self.preempted = 0  # sequences preempted so far (a counter for /metrics)
        self._ids = itertools.count()
        self._groups = itertools.count()

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def queued_requests(self) -> int:
        return len({s.group for s in self.waiting})

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- transitions ---------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], options: SamplingParams, *,
               stop_ids: tuple[int, ...] = (),
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
                         stop_ids=stop_ids, stream=stream)
                     for p, (kept, dropped) in enumerate(fitted)
                     for i in range(options.best_of))
        self.waiting.extend(seqs)
        return seqs

    def admit(self) -> list[Seq]:
        """Move waiting sequences into the running batch, oldest first, while the pool holds
        their known tokens (less what the prefix cache has) and ``max_seqs`` allows. The
        oldest one that does not fit blocks the rest, so a long request is not starved by a
        stream of short ones. A little room is kept for the running ones to grow into.

        A sequence whose next prompt block another running sequence is computing right now
        waits for it (the others go ahead): BB3 sends its module prompts over one history at
        once, and the history is then computed once, not once per module."""
        admitted = []
        pool, bs = self.pool, self.block_size
        inflight = None  # digests of the blocks prompts are computing: built on a cache miss
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_seqs:
            seq = self.waiting[i]
            known = seq.known
            # Cached blocks must leave a token to feed: its logits pick the next token.
            # Echo needs every prompt position scored, so it computes its prompt afresh.
            usable = (known - 1) // bs
            self._digest(seq, usable)
            shared = self.prefix_caching and not seq.options.echo
            hits = pool.match_length(seq.digests[:usable]) if shared else 0
            if shared and hits < usable:
                if inflight is None:
                    inflight = {d for s in self.running if s.cached < s.known - 1
                                for d in s.digests[s.cached // bs:]}
                if seq.digests[hits] in inflight:
                    i += 1  # take it from the cache after the step that computes it
                    continue
            need = pool.blocks_for(known) - hits
            keep = max(1, pool.num_blocks // 100) if self.running else 0
            if need > pool.available - keep:
                break
            self.waiting.pop(i)
            seq.blocks = pool.lookup(seq.digests[:usable]) if shared else []
            seq.cached = len(seq.blocks) * bs
            reach = pool.blocks_for(min(seq.reserve, self.context_len))
            pool.plan_home(seq.id, seq.blocks[-1] if seq.blocks else None,
                           reach - len(seq.blocks))
            while len(seq.blocks) < pool.blocks_for(known):
                block = pool.allocate(seq.id, seq.blocks[-1] if seq.blocks else None)
                if block is None:  # cached blocks it matched were counted as room: undo
                    pool.release(seq.id, seq.blocks)
                    seq.blocks, seq.cached = [], 0
                    self.waiting.insert(i, seq)
                    return admitted
                seq.blocks.append(block)
            seq.state = RUNNING
            self.running.append(seq)
            admitted.append(seq)
            if inflight is not None:
                inflight.update(seq.digests[hits:usable])  # blocks it is about to compute
        return admitted

    def step_plan(self) -> StepPlan:
        """This step's rows: the newest token of every decoding sequence (taking a block when
        it starts one, preempting the youngest sequence when the pool is full), then prompt
        chunks, oldest first, while ``step_tokens`` lasts."""
        decode, waiting, bs, preempted = [], [], self.block_size, self.preempted
        add, row = decode.append, Row  # a step makes one row per running sequence
        for seq in list(self.running):
            cached, prompt, generated = seq.cached, seq.prompt, seq.generated
            todo = len(prompt) + len(generated) - cached  # seq.known - cached, inlined
            if todo != 1 or seq.state is not RUNNING:
                if todo > 1:
                    waiting.append(seq)  # prompt left to compute
                continue
            blocks = seq.blocks
            # A block is taken when the new token starts one (the common case needs none).
            if cached < len(blocks) * bs or self._room(seq, cached + 1):
                token = generated[-1] if generated and cached >= len(prompt) else prompt[cached]
                add(row(seq, cached, (token,), tuple(seq.blocks), True))
        if self.preempted != preempted:  # _room preempted some
            decode = [r for r in decode if r.seq.state == RUNNING]
        budget, prefill = self.step_tokens, []
        for seq in waiting:
            if budget <= 0:
                break
            if seq.state != RUNNING:
                continue
            n = min(seq.known - seq.cached, budget)
            end = seq.cached + n
            prefill.append(Row(seq, seq.cached, seq.tokens(seq.cached, end), tuple(seq.blocks),
                               last=end == seq.known))
            budget -= n
        return StepPlan(tuple(decode + prefill))

    def _room(self, seq: Seq, tokens: int) -> bool:
        """Blocks for ``tokens`` positions of ``seq``, preempting the youngest running
        sequences for them; False when ``seq`` itself had to go."""
        while len(seq.blocks) < self.pool.blocks_for(tokens):
            block = self.pool.allocate(seq.id, seq.blocks[-1] if seq.blocks else None)
            if block is not None:
                seq.blocks.append(block)
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Seq) -> None:
        """Back to the head of the queue, its blocks released (recompute on readmission)."""
        self.pool.release(seq.id, seq.blocks)
        self.running.remove(seq)
        seq.blocks, seq.cached, seq.state = [], 0, WAITING
        seq.preemptions += 1
        self.preempted += 1
        self.waiting.insert(0, seq)

    def commit(self, plan: StepPlan, sampled: Mapping[int, int]) -> None:
        """Record a step: the rows' tokens are in the cache now, and ``sampled[seq.id]`` is the
        token drawn for each ``last`` row (absent when the engine stops the sequence without
        drawing, e.g. max_tokens 0; it must then finish it). Blocks that filled up are
        offered to the prefix cache."""
        bs, caching = self.block_size, self.prefix_caching
        for row in plan.rows:
            seq = row.seq
            if seq.state != RUNNING:
                continue  # cancelled while the step ran
            seq.cached = cached = row.start + len(row.tokens)
            if row.last and seq.id in sampled:
                seq.generated.append(sampled[seq.id])
            full, first = cached // bs, row.start // bs
            if full > first:  # the row filled a block (a decode row: one step in bs)
                self._digest(seq, full)
                if caching:
                    for i in range(first, full):
                        self.pool.register(seq.blocks[i], seq.digests[i])

    def _digest(self, seq: Seq, blocks: int) -> None:
        """Extend ``seq.digests`` to its first ``blocks`` full blocks (hashing only new ones)."""
        have, bs = len(seq.digests), self.block_size
        if have < blocks:
            seq.digests += chain_digests(seq.tokens(have * bs, blocks * bs), bs,
                                         seq.digests[-1] if seq.digests else b"")

    def finish(self, seq: Seq) -> None:
        """Release a sequence's blocks (or take it out of the queue)."""
        if seq.state == RUNNING:
            self.running.remove(seq)
            self.pool.release(seq.id, seq.blocks)
            seq.blocks = []
        elif seq.state == WAITING:
            self.waiting.remove(seq)
        seq.state = FINISHED

    def cancel(self, group: int) -> list[Seq]:
        """Drop every unfinished sequence of a request (timeout, client gone)."""
        seqs = [s for s in self.waiting + self.running if s.group == group]
        for seq in seqs:
            self.finish(seq)
        return seqs
