"""CUDA graphs for decode-only steps: captured once per batch-size bucket, replayed each step.

A step whose every row feeds one token and wants its logits (plain decoding, no prompt chunk,
no echo) and whose batch fits a bucket is *replayed*: its tokens, positions, key counts and
block tables are copied into static buffers with one host-to-device copy, the rows past the
real batch point at a scratch block the block pool never hands out (so they write nowhere
that matters), and the graph of the whole forward (embeddings, every layer with its paged
decode attention and KV write, the final norm and the tied head) runs as one launch. Sampling
stays outside, on the real rows' logits. Any other step runs eagerly on the wrapped runner.

Graphs are captured largest bucket first into one shared memory pool (smaller graphs then reuse
the largest one's memory), after a warm-up of each bucket outside capture (kernels compile
then). The factory is injected: ``CudaGraphs`` on a GPU; the tests' fake records the function
and calls it again at replay, on the same static buffers, so the runner's logic runs on a CPU.
With tensor parallelism every rank derives the same bucket from the same ``StepWork`` and
replays its own graph (the all-reduces are captured too).
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from opt_serving.decoding.work import StepWork
from opt_serving.model import AttentionRows

from .runner import ModelRunner

log = logging.getLogger("opt_serve.graphs")


def default_buckets(max_seqs: int, largest: int = 256) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to ``largest`` (vLLM's and SGLang's shape), capped by the
    batch limit."""
    top = min(max_seqs, largest)
    sizes = [1, 2, 4, *range(8, top + 1, 8)]
    return tuple(sorted({s for s in sizes if s <= top} | {top}))


class Captured(Protocol):
    output: torch.Tensor

    def replay(self) -> None: ...


class CudaGraphs:
    """The real factory: ``capture(fn)`` records ``fn`` in a CUDA graph sharing one pool."""

    def __init__(self, device: torch.device):
        self.device, self.pool = device, None
        self.stream = torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], torch.Tensor]) -> Captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn()
        self.pool = graph.pool()
        return _CudaCaptured(graph, output)

    def warm_up(self, fn: Callable[[], torch.Tensor]) -> None:
        """Run ``fn`` outside capture first, on the capture stream (Triton compiles then)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        torch.cuda.synchronize(self.device)

    def memory(self) -> int:
        return torch.cuda.memory_reserved(self.device)


@dataclass
class _CudaCaptured:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor

    def replay(self) -> None:
        self.graph.replay()


@dataclass(frozen=True)
class CaptureStats:
    buckets: tuple[int, ...]
    seconds: float
    pool_bytes: int


class GraphRunner:
    """A ``ModelRunner`` whose decode-only steps replay captured graphs (module docstring).

    ``scratch``: the cache block no sequence ever holds (the cache has it beyond the pool's
    blocks); ``max_blocks``: block-table width, enough for ``max_seq_len`` positions."""

    def __init__(self, runner: ModelRunner, buckets: tuple[int, ...], *, scratch: int,
                 max_blocks: int, graphs=None):
        self.runner, self.buckets = runner, tuple(sorted(buckets))
        self.scratch, self.max_blocks = scratch, max_blocks
        self.graphs = graphs if graphs is not None else CudaGraphs(runner.device)
        top, dev = self.buckets[-1], runner.device
        # One int64 buffer holds every input, so a replay needs one host-to-device copy:
        # tokens (top,), positions (top,), key counts (top,), block tables (top, max_blocks).
        self._inputs = torch.zeros(top * (3 + max_blocks), dtype=torch.long, device=dev)
        self._staging = torch.zeros_like(self._inputs, device="cpu",
                                     pin_memory=dev.type == "cuda")
        self._captured: dict[int, Captured] = {}
        self.replays = 0  # steps replayed (the rest ran eagerly)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def cache(self):
        return self.runner.cache

    def _views(self, inputs: torch.Tensor, bucket: int):
        top = self.buckets[-1]
        tokens, positions, lens, tables = inputs.split([top, top, top, top * self.max_blocks])
        return (tokens[:bucket], positions[:bucket], lens[:bucket],
                tables.view(top, self.max_blocks)[:bucket])

    def _forward(self, bucket: int) -> torch.Tensor:
        """The captured computation: a decode step of ``bucket`` rows on the static buffers."""
        tokens, positions, lens, tables = self._views(self._inputs, bucket)
        rows = AttentionRows.decoding(positions, lens, tables, self.cache.block_size)
        return self.runner.model.step(tokens, positions, self.cache, rows, None)

    def capture(self) -> CaptureStats:
        """Every bucket, largest first (one pool); rows point at the scratch block meanwhile."""
        started, before = time.perf_counter(), self.graphs.memory()
        self._fill(self._staging, 0, StepWork(*(torch.zeros(0, dtype=torch.long),) * 3,
                                              torch.zeros(0, 1, dtype=torch.long),
                                              torch.zeros(0, dtype=torch.long)))
        self._inputs.copy_(self._staging)
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                forward = functools.partial(self._forward, bucket)
                self.graphs.warm_up(forward)
                self._captured[bucket] = self.graphs.capture(forward)
        stats = CaptureStats(self.buckets, time.perf_counter() - started,
                             self.graphs.memory() - before)
        log.info("captured %d CUDA graphs (batch %d..%d) in %.1f s, %.1f MiB", len(self.buckets),
                 self.buckets[0], self.buckets[-1], stats.seconds, stats.pool_bytes / 2**20)
        return stats

    def bucket_for(self, work: StepWork) -> int | None:
        """The smallest bucket that holds this step, or None when it must run eagerly."""
        b = work.lengths.shape[0]
        decode_only = (work.tokens.shape[0] == b and work.select.shape[0] == b
                       and work.tables.shape[1] <= self.max_blocks
                       and bool((work.select == torch.arange(b)).all()))
        if not decode_only or b == 0 or b > self.buckets[-1]:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, b)]

    def _fill(self, staging: torch.Tensor, b: int, work: StepWork) -> None:
        """Real rows first, then padding on the scratch block (token 0 at position 0)."""
        tokens, positions, lens, tables = self._views(staging, self.buckets[-1])
        tokens.zero_(), positions.zero_(), lens.fill_(1), tables.fill_(self.scratch)
        tokens[:b], positions[:b] = work.tokens, work.starts
        lens[:b] = work.starts + 1
        m = work.tables.shape[1]
        tables[:b, :m] = work.tables.clamp(min=0)  # -1 pads lie past every row's keys

    @torch.inference_mode()
    def run(self, work: StepWork) -> torch.Tensor:
        bucket = self.bucket_for(work) if self._captured else None
        if bucket is None:
            return self.runner.run(work)
        b = work.lengths.shape[0]
        self._fill(self._staging, b, work)
        self._inputs.copy_(self._staging, non_blocking=True)
        graph = self._captured[bucket]
        graph.replay()
        self.replays += 1
        return graph.output[:b]
