"""One decoding step, thread-free: plan, forward, sample, commit, stop (early TGI's
``generate_token(batch)``).

``Stepper.plan()`` admits waiting sequences and asks the scheduler for this step's rows;
``Stepper.step(plan)`` runs the forward it was given on the plan's tensors, draws every row's
next token with the row's own options and RNG, commits them and checks the stop criteria. It
returns ``Event``s (a stream's new text, a finished sequence, a sequence that failed) and
knows nothing of threads, HTTP or ranks: the server's ``Engine`` routes the events to request
handles, ``generate`` collects them.
"""

from __future__ import annotations

import bisect
import logging
import operator
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from opt_serving.config import EOS_ID
from opt_serving.protocol import EngineError, TopK

from .sampling import RowParams, gather_logprobs, log_probs, next_tokens, top_logprobs
from .scheduler import Scheduler, StepPlan
from .sequence import RUNNING, Delta, Seq, SeqResult
from .stopping import StopStatus, releasable
from .work import LogitIndex, StepWork, build_work

log = logging.getLogger("opt_serve.step")
_SEQ_ID = operator.attrgetter("id")

# The forward of one step: logits (S, V) at the packed rows the work selects.
Forward = Callable[[StepWork], torch.Tensor]


@dataclass(frozen=True)
class Event:
    """What a step did to one sequence: new streamed output, its end, or its failure."""

    seq: Seq
    delta: Delta | None = None  # streaming sequences only
    result: SeqResult | None = None  # finished
    error: EngineError | None = None  # failed: its whole request is cancelled


class StepFailed(Exception):
    """The step raised: no row of ``plan`` advanced. The caller decides what fails: with
    several ranks, a failure ``in_forward`` may have left the others inside a collective."""

    def __init__(self, plan: StepPlan, error: Exception, in_forward: bool):
        super().__init__(f"{type(error).__name__}: {error}")
        self.plan, self.error, self.in_forward = plan, error, in_forward


class Stepper:
    """Steps a scheduler's sequences on ``forward``; ``token_bytes(id)`` is the tokenizer's."""

    def __init__(self, scheduler: Scheduler, forward: Forward,
                 token_bytes: Callable[[int], bytes]):
        self.scheduler, self.forward, self.token_bytes = scheduler, forward, token_bytes
        self.tokens_generated = 0
        self.prompt_tokens_computed = 0  # prompt positions run through the model
        self.steps = 0
        self._rows: tuple[tuple, RowParams] | None = None  # (batch key, its RowParams)

    def _row_params(self, seqs: list[Seq], device) -> RowParams | None:
        """The rows' options as tensors; the last step's when the batch is the same
        sequences in the same order (most decode steps), so they are not built again."""
        if not seqs:
            return None
        key = (tuple(map(_SEQ_ID, seqs)), str(device))
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, RowParams.stack([s.options for s in seqs], device=device))
        return self._rows[1]

    def plan(self) -> StepPlan:
        self.scheduler.admit()
        return self.scheduler.step_plan()

    def step(self, plan: StepPlan) -> list[Event]:
        """Run ``plan``; raises StepFailed when the forward or the sampling does."""
        if not plan.rows:
            return []
        work, index = build_work(plan)
        try:
            logits = self.forward(work)
        except Exception as e:  # noqa: BLE001 - the caller knows whether the ranks survive
            raise StepFailed(plan, e, in_forward=True) from e
        self.steps += 1
        self.prompt_tokens_computed += index.prompt_tokens
        try:
            return self._sample(plan, index, logits)
        except Exception as e:  # noqa: BLE001 - rank 0 only: the ranks are still in step
            raise StepFailed(plan, e, in_forward=False) from e

    # -- after the forward -------------------------------------------------------------------

    def _sample(self, plan: StepPlan, index: LogitIndex, logits: torch.Tensor) -> list[Event]:
        events: list[Event] = []
        if index.plain:  # a decode step: row i's logits are logits[i], every row draws
            seqs = last = [r.seq for r in plan.rows]
            mine = logits
        else:
            last, at = [], []  # every row that reached its newest token, and its logits' row
            for row, first, count in zip(plan.rows, index.first, index.count):
                if row.seq.options.echo:
                    echo_scores(row.seq, row.start, logits[first:first + count])
                if row.last:
                    last.append(row.seq)
                    at.append(first + count - 1)
            drawing = [j for j, seq in enumerate(last) if seq.max_tokens > 0]
            seqs, rows = [last[j] for j in drawing], [at[j] for j in drawing]
            mine = logits.index_select(0, torch.tensor(rows, dtype=torch.long,
                                                       device=logits.device))
        drawn = draw_isolated(seqs, mine, self._row_params(seqs, logits.device))
        for j, error in drawn.failed.items():
            seq = seqs[j]
            if seq.state == RUNNING:  # only its request fails; the batch goes on
                log.error("sequence %d failed while sampling: %s", seq.id, error)
                self.scheduler.cancel(seq.group)
                events.append(Event(seq, error=EngineError(
                    500, f"generation failed for this request: {error}",
                    code="generation_failed")))
        sampled = dict(zip(map(_SEQ_ID, seqs), drawn.tokens))
        for j in drawn.failed:
            del sampled[seqs[j].id]
        self.scheduler.commit(plan, sampled)
        if len(seqs) < len(last):  # scoring only (echo): nothing was drawn
            for seq in last:
                if seq.state == RUNNING and seq.max_tokens == 0:
                    events.append(self._finish(seq, StopStatus(True, "length", 0, 0)))
        tops = drawn.tops or [None] * len(seqs)
        token_bytes, generated = self.token_bytes, 0
        for seq, token, logprob, top in zip(seqs, drawn.tokens, drawn.logprobs, tops):
            if seq.state != RUNNING:  # failed, or cancelled while the step ran
                continue
            eos = token == EOS_ID
            status = seq.add(token, b"" if eos else token_bytes(token), logprob, top, eos)
            generated += 1
            if status.stop:
                events.append(self._finish(seq, status))
            elif seq.stream:
                upto = releasable(seq.text, seq.options.stop_bytes)
                delta = seq.delta(upto, bisect.bisect_right(seq.ends, upto), None)
                if delta is not None:
                    events.append(Event(seq, delta=delta))
        self.tokens_generated += generated
        return events

    def _finish(self, seq: Seq, status: StopStatus) -> Event:
        self.scheduler.finish(seq)
        delta = (seq.delta(status.keep_bytes, status.keep_tokens, status.finish_reason or "length")
                 if seq.stream else None)
        return Event(seq, delta=delta, result=seq.result(status))


def echo_scores(seq: Seq, start: int, logits: torch.Tensor) -> None:
    """Teacher-forced log-probs of the prompt: position start + j scores prompt token
    start + j + 1.  logits: (n, V) for the chunk's positions. Positions scored already are
    skipped: a preempted sequence computes its prompt again."""
    begin = max(start, len(seq.prompt_logprobs))
    n = min(start + logits.shape[0], len(seq.prompt) - 1) - begin
    if n <= 0:
        return
    lp = log_probs(logits[begin - start:begin - start + n])  # (n, V)
    targets = torch.tensor(seq.prompt[begin + 1:begin + 1 + n], device=lp.device)
    seq.prompt_logprobs += gather_logprobs(lp, targets).tolist()
    k = seq.options.num_logprobs
    if k:
        values, ids = top_logprobs(lp, k)
        seq.prompt_tops += [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class Draws(NamedTuple):
    """What B rows drew: row j's token, its log-prob and (when asked for) the top
    alternatives; rows that could not draw are in ``failed`` (row index -> why), their
    token -1. Lists, not one object per row: a step draws for every running sequence."""

    tokens: list[int]
    logprobs: list[float]
    tops: list[TopK | None] | None  # None when no row asked for alternatives
    failed: dict[int, Exception]


def draw_isolated(seqs: list[Seq], logits: torch.Tensor, rp: RowParams | None = None) -> Draws:
    """``draw`` for the batch; when it raises, each row alone from the same RNG state, so
    the rows that can draw draw what they would have and only the broken one fails."""
    if not seqs:
        return Draws([], [], None, {})
    # Greedy rows draw nothing: only sampling rows need their RNG state kept.
    if rp is not None and rp.all_greedy:
        states = [None] * len(seqs)
    else:
        greedy = rp.greedy_rows if rp is not None else [s.options.greedy for s in seqs]
        states = [None if g else s.generator.get_state() for s, g in zip(seqs, greedy)]
    try:
        return draw(seqs, logits, rp)
    except Exception:  # noqa: BLE001
        out = Draws([-1] * len(seqs), [0.0] * len(seqs), [None] * len(seqs), {})
        for j, (seq, state) in enumerate(zip(seqs, states)):
            if state is not None:
                seq.generator.set_state(state)
            try:
                one = draw([seq], logits[j:j + 1])
            except Exception as e:  # noqa: BLE001
                out.failed[j] = e
                continue
            if one.failed:
                out.failed[j] = one.failed[0]
                continue
            out.tokens[j], out.logprobs[j] = one.tokens[0], one.logprobs[0]
            out.tops[j] = one.tops[0] if one.tops else None
        return out


def draw(seqs: list[Seq], logits: torch.Tensor, rp: RowParams | None = None) -> Draws:
    """What each sequence draws from its row of ``logits`` (N, V); a row whose processed
    scores are NaN (no distribution to draw from) fails with a ValueError instead, so that
    it alone fails."""
    rp = rp or RowParams.stack([s.options for s in seqs], device=logits.device)
    # Only what the batch's options use is gathered from the rows (greedy rows without
    # penalties, the common case, need none of it).
    tokens, lps = next_tokens(
        logits, rp, generated=[s.generated for s in seqs] if rp.needs_history else (),
        sources=[s.source for s in seqs] if rp.src_penalised else (),
        stop_ids=[s.stop_ids for s in seqs] if rp.min_tokens else (),
        prompts=[s.prompt for s in seqs] if rp.repeated else (),
        generators=() if rp.all_greedy else
        [None if g else s.generator for s, g in zip(seqs, rp.greedy_rows)])
    # A NaN or +inf score leaves a NaN in its row of log-probs (all -inf: NaN everywhere):
    # the row's sum shows it, for a twentieth of the cost of isnan().any() over (N, V).
    broken = torch.isnan(lps.sum(dim=-1))  # (N,)
    chosen = gather_logprobs(lps, tokens)  # (N,)
    # One copy back for the step: ids, their log-probs and the broken flags (float64 holds
    # every id and every float32 exactly); the columns are split on the host.
    packed = torch.stack([tokens.double(), chosen.double(), broken.double()]).cpu()
    ids_out, logprobs = packed[0].long().tolist(), packed[1].tolist()
    failed: dict[int, Exception] = {}
    if packed[2].any():
        for j in torch.nonzero(packed[2]).flatten().tolist():
            failed[j] = ValueError("the model's scores for it are not finite numbers "
                                   "(NaN or infinity)")
            ids_out[j] = -1
    tops = None
    k = max(rp.wants)
    if k:
        values, ids = top_logprobs(lps, k)
        tops = [list(zip(i[:w], v[:w])) if w else None
                for i, v, w in zip(ids.tolist(), values.tolist(), rp.wants)]
    return Draws(ids_out, logprobs, tops, failed)
