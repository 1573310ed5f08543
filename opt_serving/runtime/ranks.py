"""The rank protocol: how rank 0 sends each step's work to the other ranks, and their loop.

Rank 0 owns the scheduler; the other ranks own only their part of the model and of the KV
cache. Before each step rank 0 broadcasts a ``StepWork`` over a gloo control group (CPU
tensors, also when the model's own group is NCCL) and then every rank runs the same forwards,
so their collectives line up. A message is a fixed int64 header ``(op, N, B, M, S)`` and, for a
step, one flat int64 payload (``StepWork``'s tensors one after the other); every opcode is
here. While idle, rank 0 pings: a broadcast plus an all-reduce, i.e. a round trip, so a dead
rank shows up as an error or a timeout of the control group instead of a hang in the next
forward.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from opt_serving.decoding.work import StepWork

from .runner import StepRunner

OP_STEP, OP_PING, OP_SHUTDOWN = 1, 2, 3
HEADER_LEN = 5


def step_header(work: StepWork) -> torch.Tensor:
    """(op, N packed tokens, B sequences, M table width, S selected rows)."""
    b, m = work.tables.shape
    return torch.tensor([OP_STEP, work.tokens.shape[0], b, m, work.select.shape[0]],
                        dtype=torch.long)


def step_payload(work: StepWork) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in (
        work.tokens, work.starts, work.lengths, work.tables, work.select)])


def payload_len(n: int, b: int, m: int, s: int) -> int:
    return n + 2 * b + b * m + s


def step_from_payload(n: int, b: int, m: int, s: int, flat: torch.Tensor) -> StepWork:
    tokens, starts, lengths, tables, select = flat.split([n, b, b, b * m, s])
    return StepWork(tokens, starts, lengths, tables.view(b, m), select)


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
        dist.broadcast(step_header(work), src=0, group=self.group)
        dist.broadcast(step_payload(work), src=0, group=self.group)

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
        op, n, b, m, s = (int(x) for x in h)
        if op == OP_PING:
            dist.all_reduce(torch.zeros(1), group=self.group)
            return op, None
        if op != OP_STEP:
            return op, None
        flat = torch.empty(payload_len(n, b, m, s), dtype=torch.long)
        dist.broadcast(flat, src=0, group=self.group)
        return op, step_from_payload(n, b, m, s, flat)


def worker_loop(runner: StepRunner, control: Control) -> None:
    """A rank > 0: run every step rank 0 sends until it says stop. Any exception (a failed
    forward, a dead peer, a control-group timeout) propagates: the caller exits non-zero
    rather than leave the other ranks waiting in a collective (metaseq defect 9)."""
    while True:
        op, work = control.receive()
        if op == OP_SHUTDOWN:
            return
        if work is not None:
            runner.run(work)

