"""One step's work as tensors.

``build_work`` turns a ``StepPlan`` into a ``StepWork``: the new tokens of every sequence
packed one after the other (no padding), their positions, each sequence's block table, and
the packed rows whose logits are wanted. It is int64 CPU tensors, which rank 0 also
broadcasts to the other ranks (``runtime.ranks``); ``runtime.runner.ModelRunner`` runs it on
one rank's model and KV cache as a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheduler import StepPlan


@dataclass(frozen=True)
class StepWork:
    """One step as int64 CPU tensors: N packed tokens of B sequences, block tables M wide,
    logits wanted at S packed rows."""

    tokens: torch.Tensor  # (N,)
    starts: torch.Tensor  # (B,) position of each sequence's first new token
    lengths: torch.Tensor  # (B,) new tokens per sequence (they sum to N)
    tables: torch.Tensor  # (B, M) block tables, padded with -1
    select: torch.Tensor  # (S,) packed rows whose logits are wanted


@dataclass(frozen=True)
class LogitIndex:
    """Where each plan row's logits land among the S selected: rows ``first[i]`` ..
    ``first[i] + count[i] - 1`` (every position of the chunk for echo rows, else only the
    last when the row is ``last``, else none)."""

    first: tuple[int, ...]
    count: tuple[int, ...]


def build_work(plan: StepPlan) -> tuple[StepWork, LogitIndex]:
    """Tensors for ``plan``. Echo rows need logits at every position of their chunk
    (teacher-forced prompt log-probs), the others only at the last one."""
    tokens, select, first, count = [], [], [], []
    width = max((len(r.blocks) for r in plan.rows), default=0)
    for r in plan.rows:
        n, at = len(r.tokens), len(tokens)
        tokens += r.tokens
        chosen = range(at, at + n) if r.seq.options.echo else \
            (range(at + n - 1, at + n) if r.last else range(0))
        first.append(len(select))
        count.append(len(chosen))
        select += chosen
    work = StepWork(
        tokens=torch.tensor(tokens, dtype=torch.long),
        starts=torch.tensor([r.start for r in plan.rows], dtype=torch.long),
        lengths=torch.tensor([len(r.tokens) for r in plan.rows], dtype=torch.long),
        tables=torch.tensor([list(r.blocks) + [-1] * (width - len(r.blocks))
                             for r in plan.rows], dtype=torch.long).view(len(plan.rows), width),
        select=torch.tensor(select, dtype=torch.long))
    return work, LogitIndex(tuple(first), tuple(count))
