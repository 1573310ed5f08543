"""The rank protocol: the work of one step, how rank 0 sends it, and the forward every rank runs.

Rank 0 owns the scheduler; the other ranks own only their part of the model and of the KV
cache. Before each step rank 0 broadcasts a ``StepWork`` over a gloo control group (CPU
tensors, also when the model's own group is NCCL) and then every rank runs the same forwards,
so their collectives line up. A message is a fixed int64 header ``(op, Bp, T, K, Bd)`` and, for
a step, one flat int64 payload. While idle, rank 0 pings: a broadcast plus an all-reduce, i.e.
a round trip, so a dead rank shows up as an error or a timeout of the control group instead of
a hang in the next forward.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from opt_serving.config import PAD_ID
from opt_serving.model import KVCache, OPTModel

from .scheduler import StepPlan

OP_STEP, OP_PING, OP_SHUTDOWN = 1, 2, 3
HEADER_LEN = 5


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


def build_work(plan: StepPlan, wants_all: Callable[[object], bool]) -> tuple[StepWork, LogitIndex]:
    """Tensors for ``plan``. ``wants_all(seq)``: the row needs logits at every position of its
    chunk (echo: teacher-forced prompt log-probs), not only at the last one."""
    pre = plan.prefill
    t = max((len(r.tokens) for r in pre), default=0)
    selects, last, counts = [], [], []
    for r in pre:
        n = len(r.tokens)
        sel = list(range(n)) if wants_all(r.seq) else [n - 1]
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


class Control:
    """The gloo control group between rank 0 and the workers (nothing to do at world size 1)."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size = world_size
        self.group = None
        if world_size > 1:
            # A collective of its own, so it must run on every rank in the same order.
            self.group = dist.new_group(backend="gloo",
                                        timeout=datetime.timedelta(seconds=timeout_s))

    def _header(self, *values: int) -> None:
        h = torch.zeros(HEADER_LEN, dtype=torch.long)
        h[:len(values)] = torch.tensor(values, dtype=torch.long)
        dist.broadcast(h, src=0, group=self.group)

    # -- rank 0 ------------------------------------------------------------------------------

    def send_step(self, work: StepWork) -> None:
        if self.group is None:
            return
        dist.broadcast(work.header(), src=0, group=self.group)
        dist.broadcast(work.payload(), src=0, group=self.group)

    def ping(self) -> None:
        """A round trip: raises (or times out) when a rank is gone."""
        if self.group is None:
            return
        self._header(OP_PING)
        dist.all_reduce(torch.zeros(1), group=self.group)

    def send_shutdown(self) -> None:
        if self.group is not None:
            self._header(OP_SHUTDOWN)

    # -- every rank --------------------------------------------------------------------------

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. the KV-cache tokens each can hold)."""
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t)

    # -- workers -----------------------------------------------------------------------------

    def receive(self) -> tuple[int, StepWork | None]:
        h = torch.zeros(HEADER_LEN, dtype=torch.long)
        dist.broadcast(h, src=0, group=self.group)
        op, bp, t, k, bd = (int(x) for x in h)
        if op == OP_PING:
            dist.all_reduce(torch.zeros(1), group=self.group)
            return op, None
        if op != OP_STEP:
            return op, None
        flat = torch.empty(StepWork.payload_len(bp, t, k, bd), dtype=torch.long)
        dist.broadcast(flat, src=0, group=self.group)
        return op, StepWork.from_payload(bp, t, k, bd, flat)


def worker_loop(runner: ModelRunner, control: Control) -> None:
    """A rank > 0: run every step rank 0 sends until it says stop. Any exception (a failed
    forward, a dead peer, a control-group timeout) propagates: the caller exits non-zero
    rather than leave the other ranks waiting in a collective (metaseq defect 9)."""
    while True:
        op, work = control.receive()
        if op == OP_SHUTDOWN:
            return
        if work is not None:
            runner.run(work)

