"""One step's work as tensors, and the forward each rank runs on it.

``build_work`` turns a ``StepPlan`` into a ``StepWork`` (int64 CPU tensors, which rank 0 also
broadcasts to the other ranks, see ``server.ranks``); ``ModelRunner`` runs it on one rank's
model and KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opt_serving.config import PAD_ID
from opt_serving.model import KVCache, OPTModel

from .scheduler import StepPlan

OP_STEP = 1  # the rank protocol's header op for a step (server.ranks has the others)


@dataclass(frozen=True)
class StepWork:
    """One step's two forwards, as int64 CPU tensors (a batch may be empty: B = 0)."""

    prefill_tokens: torch.Tensor  # (Bp, T) right-padded with PAD_ID
    prefill_start: torch.Tensor  # (Bp,) tokens already cached per row
    prefill_slots: torch.Tensor  # (Bp,) cache rows
    prefill_select: torch.Tensor  # (Bp, K) time indices whose logits are needed
    decode_tokens: torch.Tensor  # (Bd, 1)
    decode_start: torch.Tensor  # (Bd,)
    decode_slots: torch.Tensor  # (Bd,)

    def header(self) -> torch.Tensor:
        bp, t = self.prefill_tokens.shape
        return torch.tensor([OP_STEP, bp, t, self.prefill_select.shape[1],
                             self.decode_tokens.shape[0]], dtype=torch.long)

    def payload(self) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for x in (
            self.prefill_tokens, self.prefill_start, self.prefill_slots, self.prefill_select,
            self.decode_tokens, self.decode_start, self.decode_slots)])

    @staticmethod
    def payload_len(bp: int, t: int, k: int, bd: int) -> int:
        return bp * t + 2 * bp + bp * k + 3 * bd

    @classmethod
    def from_payload(cls, bp: int, t: int, k: int, bd: int, flat: torch.Tensor) -> "StepWork":
        sizes = [bp * t, bp, bp, bp * k, bd, bd, bd]
        a, b, c, d, e, f, g = flat.split(sizes)
        return cls(a.view(bp, t), b, c, d.view(bp, k), e.view(bd, 1), f, g)


@dataclass(frozen=True)
class LogitIndex:
    """Where each plan row's logits land. ``prefill_last[i]``: the K index of prefill row i's
    last real position; ``prefill_positions[i]``: how many real positions row i selected (all
    of its chunk for echo rows, else 1)."""

    prefill_last: tuple[int, ...]
    prefill_positions: tuple[int, ...]


def build_work(plan: StepPlan) -> tuple[StepWork, LogitIndex]:
    """Tensors for ``plan``. Echo rows need logits at every position of their chunk
    (teacher-forced prompt log-probs), the others only at the last one."""
    pre = plan.prefill
    t = max((len(r.tokens) for r in pre), default=0)
    selects, last, counts = [], [], []
    for r in pre:
        n = len(r.tokens)
        sel = list(range(n)) if r.seq.options.echo else [n - 1]
        selects.append(sel)
        last.append(len(sel) - 1)
        counts.append(len(sel))
    k = max((len(s) for s in selects), default=0)
    # Rows that need fewer positions repeat their last one: the (Bp, K) gather stays square.
    select = [s + [s[-1]] * (k - len(s)) for s in selects]
    tokens = [list(r.tokens) + [PAD_ID] * (t - len(r.tokens)) for r in pre]
    dec = plan.decode
    work = StepWork(
        prefill_tokens=torch.tensor(tokens, dtype=torch.long).view(len(pre), t),
        prefill_start=torch.tensor([r.start for r in pre], dtype=torch.long),
        prefill_slots=torch.tensor([r.slot for r in pre], dtype=torch.long),
        prefill_select=torch.tensor(select, dtype=torch.long).view(len(pre), k),
        decode_tokens=torch.tensor([r.tokens for r in dec], dtype=torch.long).view(len(dec), 1),
        decode_start=torch.tensor([r.start for r in dec], dtype=torch.long),
        decode_slots=torch.tensor([r.slot for r in dec], dtype=torch.long))
    return work, LogitIndex(tuple(last), tuple(counts))


class ModelRunner:
    """One rank's model and KV cache; runs a StepWork as a (Bp, T) and a (Bd, 1) forward."""

    def __init__(self, model: OPTModel, cache: KVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device

    @torch.inference_mode()
    def run(self, work: StepWork) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefill logits (Bp, K, V) or None, decode logits (Bd, V) or None), on the device."""
        dev = self.device
        prefill = decode = None
        if work.prefill_tokens.shape[0]:
            prefill = self.model(work.prefill_tokens.to(dev), start=work.prefill_start.to(dev),
                                 cache=self.cache, slots=work.prefill_slots.to(dev),
                                 select=work.prefill_select.to(dev))
        if work.decode_tokens.shape[0]:
            decode = self.model(work.decode_tokens.to(dev), start=work.decode_start.to(dev),
                                cache=self.cache, slots=work.decode_slots.to(dev))[:, 0]
        return prefill, decode
