"""Benchmark BlenderBot 1's engine against HF ``generate`` on the same random weights and dtype.

    python scripts/bench_seq2seq.py                          # 90M and 400M shapes, CPU-sized
    python scripts/bench_seq2seq.py --device cuda --max-tokens 128 --dtype fp16   # on a GPU
    python scripts/bench_seq2seq.py --models blender-tiny --concurrency 1 4 --max-tokens 8

Report only (no assertions): for each model, the latency of one reply alone and replies/s
with 8 and 32 requests at once, beam 10 (gen/blenderbot: minimum length 20, 3-gram blocking
on the reply and the context, length penalty 0.65), 128-token contexts. Ours: the batching
engine (``BeamEngine``), all requests submitted together. HF: one batched
``generate(num_beams=10, ...)`` over the same requests with its nearest settings
(``no_repeat_ngram_size=3``, ``encoder_no_repeat_ngram_size=3``, ``min_length``,
``length_penalty``, ``__start__`` suppressed). Runs alternate ours / HF in every round (the
machines are noisy); medians are reported, with the ratio. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from opt_serving.blenderbot.config import PRESETS, START_ID
from opt_serving.blenderbot.engine import BeamEngine
from opt_serving.blenderbot.hf import to_hf
from opt_serving.blenderbot.model import BlenderbotModel, init_random
from opt_serving.blenderbot.search import SearchOptions
from opt_serving.config import DTYPES


def contexts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (length - 1,), generator=gen).tolist() + [2]
            for _ in range(n)]


def ours(engine: BeamEngine, batch: list[list[int]], options: SearchOptions) -> tuple:
    started = time.perf_counter()
    results = engine.run(batch, options)
    return time.perf_counter() - started, sum(len(r[0].tokens) for r in results)


def hf_generate(hf, batch: list[list[int]], options: SearchOptions, device) -> tuple:
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    for i, c in enumerate(batch):
        ids[i, :len(c)] = torch.tensor(c)
    ids = ids.to(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=ids != 0, num_beams=options.beam_size,
                          do_sample=False, min_length=options.beam_min_length + 1,
                          max_new_tokens=options.max_tokens,
                          no_repeat_ngram_size=options.beam_block_ngram,
                          encoder_no_repeat_ngram_size=options.beam_context_block_ngram,
                          length_penalty=options.beam_length_penalty, early_stopping=True,
                          suppress_tokens=[START_ID])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, int((out[:, 1:] > 3).sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["blender-90m", "blender-400m-distill"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32,
                   help="reply tokens at most (random weights rarely end earlier; the "
                        "recipe's 128 on a GPU)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--forking", nargs="+", default=["copy", "share"], choices=["copy", "share"],
                   help="how beams fork in our cache: copying histories (ParlAI's reorder) "
                        "or sharing keys through tables (paged, block size 1); the first "
                        "is the one compared with HF in the chart")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    options = SearchOptions(max_tokens=args.max_tokens)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "dtype": args.dtype, "options": vars(options),
               "context": args.context, "models": {}}
    for name in args.models:
        cfg = PRESETS[name]
        model = init_random(BlenderbotModel(cfg), seed=0, std=0.02).eval()
        hf = to_hf(model).to(device, DTYPES[args.dtype])
        model = model.to(device, DTYPES[args.dtype])
        context = min(args.context, cfg.max_positions)
        engines = {f: BeamEngine(model, max_groups=max(args.concurrency), max_beams=10,
                                  max_tokens=min(args.max_tokens, cfg.max_positions),
                                  context=context, forking=f) for f in args.forking}
        rows = {}
        for n in args.concurrency:
            batch = contexts(n, context, cfg.vocab_size, seed=n)
            mine = {f: [] for f in engines}
            theirs = []
            for f, engine in engines.items():
                ours(engine, batch[:1], options)  # warm-up
                engine.reorder_seconds = engine.step_seconds = 0.0
            for _ in range(args.rounds):
                for f, engine in engines.items():
                    mine[f].append(ours(engine, batch, options))
                theirs.append(hf_generate(hf, batch, options, device))
            t_hf = statistics.median(t for t, _ in theirs)
            row = {"hf_s": t_hf, "hf_replies_s": n / t_hf, "hf_reply_tokens": theirs[-1][1]}
            for f, engine in engines.items():
                t = statistics.median(x for x, _ in mine[f])
                row[f] = {"s": t, "replies_s": n / t, "ratio": t_hf / t,
                          "reply_tokens": mine[f][-1][1],
                          # the beams' cache reordering, of the engine's step time
                          "reorder_share": engine.reorder_seconds / max(engine.step_seconds,
                                                                        1e-9)}
                print(f"{name} x{n:<3} ours ({f}) {n / t:7.2f} replies/s ({t:6.2f} s)   HF "
                      f"{n / t_hf:7.2f} replies/s ({t_hf:6.2f} s)   ours/HF {t_hf / t:.2f}x   "
                      f"(reordering {100 * row[f]['reorder_share']:.1f} % of our steps)",
                      flush=True)
            first = row[args.forking[0]]
            row.update(ours_replies_s=first["replies_s"], ratio=first["ratio"])
            rows[n] = row
        results["models"][name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_seq2seq.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bench_seq2seq.png")
    print(f"wrote {args.out / 'bench_seq2seq.json'} and {args.out / 'bench_seq2seq.png'}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], models.items()):
        ns = sorted(rows, key=int)
        ax.plot(ns, [rows[n]["ours_replies_s"] for n in ns], "-o", label="opt_serving")
        ax.plot(ns, [rows[n]["hf_replies_s"] for n in ns], "--s", label="HF generate")
        ax.set(xscale="log", xlabel="requests at once (beam 10)", ylabel="replies/s",
               title=f"{name} ({results['device']}, {results['dtype']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
