"""The engine's host time per decode step: everything but the forward (issue 18's target:
under 1 ms at 256 sequences).

    python scripts/bench_host.py --rows 256            # report only, no timed assertions

A scripted forward returns fixed logits over a tiny vocabulary, so what is timed is the
Python and the small tensor ops a step runs around the model on any device: planning the
step, building its tensors, drawing (greedy), committing, and the per-sequence bookkeeping
after the draw. On a GPU these are the gaps between forwards that CUDA graphs cannot remove.
Prints the median and mean ms of each phase and writes bench-out/bench_host.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from opt_serving.decoding import step as step_module
from opt_serving.decoding.scheduler import Scheduler
from opt_serving.decoding.step import Stepper
from opt_serving.protocol import SamplingParams


def measure(rows: int, prompt: int, steps: int, vocab: int = 64) -> dict[str, list[float]]:
    sched = Scheduler(num_blocks=rows * 24, block_size=16, max_seqs=rows, max_queued=rows,
                      step_tokens=rows * prompt, max_seq_len=2048)
    options = SamplingParams(max_tokens=steps + 8, temperature=0.0)
    for i in range(rows):
        sched.submit([[5 + (i + j) % 1000 for j in range(prompt)]], options)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, 2] = -1e9  # no EOS: every sequence runs every step
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name].append(time.perf_counter() - t)
            return out
        return run

    stepper = Stepper(sched, lambda work: logits[:work.select.shape[0]], lambda _: b"ab")
    stepper.step(stepper.plan())  # the prefill
    draw, commit = step_module.draw_isolated, sched.commit
    step_module.draw_isolated, sched.commit = timed("draw", draw), timed("commit", commit)
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            plan = stepper.plan()
            t1 = time.perf_counter()
            stepper.step(plan)
            t2 = time.perf_counter()
            times["plan"].append(t1 - t0)
            times["step (build, draw, commit, bookkeeping)"].append(t2 - t1)
            times["total"].append(t2 - t0)
    finally:
        step_module.draw_isolated = draw
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = {}
    for rows in args.rows:
        times = measure(rows, args.prompt, args.steps)
        report[rows] = {k: {"median_ms": statistics.median(v) * 1e3,
                            "mean_ms": statistics.mean(v) * 1e3} for k, v in times.items()}
        print(f"{rows} sequences:")
        for k, v in report[rows].items():
            print(f"  {k:42s} median {v['median_ms']:.3f} ms   mean {v['mean_ms']:.3f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_host.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
