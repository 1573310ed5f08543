"""``opt-capacity``: will an OPT / BlenderBot-3 model fit these GPUs, and how fast will it be?

The arithmetic lives in ``opt_serving.capacity.planner``; this module parses arguments, prints the
plan as a table (or JSON) and draws the optional chart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from .planner import (DEFAULT_ALLREDUCE_US, DEFAULT_EFFICIENCY, DEFAULT_MAX_BATCH_TOKENS,
                       DEFAULT_RESERVE_BYTES, DEFAULT_UTILISATION, CapacityError, CapacityPlan,
                       CapacityRequest, plan, throughput_curve)
from ..config import get_preset
from .gpus import CATALOGUE, GIB, custom_gpu, get_gpu

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opt-capacity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan GPUs for an OPT / BlenderBot-3 model: memory per GPU, KV cache "
                    "budget, concurrent sequences, GPUs and nodes, decode and prefill speed.",
        epilog=textwrap.dedent("""\
            examples:
              opt-capacity --model bb3-175b --gpu a100-80g --mp 16 --context 2048
              opt-capacity --checkpoint-folder /data/bb3_30b/mp8 --gpu h100-sxm
              opt-capacity --model bb3-30b --gpu a100-40g      # smallest degree that fits
              opt-capacity --model opt-66b --gpu-memory-gib 48 --gpu-bandwidth-gbs 696 \\
                  --gpu-tflops 150 --json

            The KV budget follows vLLM: memory x utilisation - weights - activation
            workspace - reserve, per GPU. Exit status: 0 fits, 1 does not fit, 2 bad input.
            GPUs: """) + ", ".join(CATALOGUE))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PRESET", help="a model preset, e.g. bb3-30b, or a "
                     "BlenderBot 1: blender-90m, blender-400m-distill, blender-1b-distill, "
                     "blender-3b, blender-9b (one GPU; --beam-size, --reply-tokens, --context "
                     "in encoder tokens, --concurrency in requests)")
    src.add_argument("--checkpoint-folder", "--checkpoint", metavar="PATH",
                     help="a checkpoint folder or file: only its config is read")
    p.add_argument("--gpu", metavar="NAME", help="a catalogue GPU (listed below; default "
                   "a100-80g); with the --gpu-* figures below, they override its own")
    p.add_argument("--gpu-memory-gib", type=float, metavar="GIB", help="custom memory per GPU "
                   "(without --gpu, give all three figures)")
    p.add_argument("--gpu-bandwidth-gbs", type=float, metavar="GB/S",
                   help="custom memory bandwidth")
    p.add_argument("--gpu-tflops", type=float, metavar="TFLOPS",
                   help="custom peak matmul throughput")
    p.add_argument("--dtype", default="fp16", help="fp32, fp16, bf16 or int8-weights "
                   "(default fp16)")
    p.add_argument("--mp", type=int, metavar="N", help="model-parallel degree (default: the "
                   "checkpoint's, else the smallest that fits)")
    p.add_argument("--context", type=int, metavar="TOKENS",
                   help="tokens per sequence, prompt + reply (default: the model's maximum)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="full-context sequences to hold at once (default 1)")
    p.add_argument("--utilisation", "--utilization", type=float, default=DEFAULT_UTILISATION,
                   metavar="F", help="fraction of GPU memory to use (default 0.9, as vLLM)")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_BYTES / GIB,
                   metavar="GIB", help="memory outside tensors: CUDA context, NCCL (default 1)")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   metavar="N", help="tokens per forward pass; sizes the activation workspace "
                   "(default 3072, metaseq's)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="N",
                   help="for counting nodes (default 8)")
    p.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY, metavar="F",
                   help="fraction of the bandwidth bound decode reaches (default 0.75)")
    p.add_argument("--allreduce-us", type=float, default=DEFAULT_ALLREDUCE_US, metavar="US",
                   help="latency of one all-reduce when split (default 64)")
    p.add_argument("--beam-size", type=int, default=10, metavar="K",
                   help="BlenderBot 1: beams per request (default 10, gen/blenderbot's)")
    p.add_argument("--reply-tokens", type=int, metavar="N",
                   help="BlenderBot 1: reply tokens at most (default: the model's positions)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG to FILE: memory per GPU by "
                   "degree, and tokens/s against batch size (its path is printed)")
    return p


def _model(args) -> tuple:
    """(config, the checkpoint's degree or None)."""
    if args.model:
        return get_preset(args.model), None
    # Imported here: only this path needs torch's checkpoint machinery.
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.formats import read_config
    try:
        return read_config(args.checkpoint_folder)
    except CheckpointError as e:
        raise CapacityError(str(e)) from None


def _gpu(args):
    custom = (args.gpu_memory_gib, args.gpu_bandwidth_gbs, args.gpu_tflops)
    if args.gpu is None and any(x is not None for x in custom):
        return custom_gpu(*custom)  # all three needed: there is no base to fill in from
    return custom_gpu(*custom, base=get_gpu(args.gpu or "a100-80g"))


def request_from_args(args) -> CapacityRequest:
    cfg, checkpoint_mp = _model(args)
    return CapacityRequest(
        cfg=cfg, gpu=_gpu(args), dtype=args.dtype, mp=args.mp or checkpoint_mp,
        context=args.context, concurrency=args.concurrency, utilisation=args.utilisation,
        reserve_bytes=int(args.reserve_gib * GIB), max_batch_tokens=args.max_batch_tokens,
        gpus_per_node=args.gpus_per_node, efficiency=args.efficiency,
        allreduce_us=args.allreduce_us)


def _g(n: float) -> str:
    return f"{n / GIB:7.1f} GiB"


def format_plan(p: CapacityPlan, why_mp: str) -> str:
    req, gpu, w = p.request, p.request.gpu, p.workspace
    ctx = req.seq_len
    s_ = "s" if p.replicas > 1 else ""
    lines = (
        ("memory", _g(gpu.memory_bytes), ""),
        (f"usable (x {req.utilisation:g})", _g(p.usable_bytes), ""),
        ("weights", _g(p.weights_bytes_per_gpu), f"whole model {p.weights_bytes / GIB:.1f} GiB"),
        ("activation workspace", _g(w.total), f"{w.tokens} tokens: logits {w.logits / GIB:.2f},"
         f" MLP {w.mlp / GIB:.2f}, hidden {w.hidden / GIB:.2f} GiB"),
        ("reserve", _g(req.reserve_bytes), "CUDA context, NCCL, fragmentation"),
        ("KV cache", _g(max(0, p.kv_budget_bytes)), f"{p.kv_budget_tokens:,} tokens at "
         f"{p.kv_bytes_per_token_per_gpu / 1024:,.0f} KiB/token"),
    )
    facts = (
        (f"sequences of {ctx} tokens", f"{p.sequences} per replica"),
        ("GPUs / nodes", f"{p.gpus} / {p.nodes} ({p.replicas} replica{s_} of {p.mp} for "
         f"{req.concurrency} concurrent, {req.gpus_per_node} GPUs per node)"),
        ("decode, batch 1, empty", f">= {p.decode_floor_ms:.1f} ms/token (weights / bandwidth)"),
        (f"decode, batch {p.batch}, full", f">= {p.decode_bound_ms:.1f} ms/step; estimate "
         f"{p.decode_estimate_ms:.1f} ms = {p.tokens_per_s:,.0f} tokens/s ({req.efficiency:.0%} "
         f"of the bound + {req.allreduce_us:g} us per all-reduce)"),
        (f"prefill, {ctx} tokens", f">= {p.prefill_bound_s:.3f} s at peak throughput"),
    )
    count = f"{p.params / 1e9:.2f} B" if p.params >= 1e9 else f"{p.params / 1e6:.1f} M"
    rows = [f"{req.cfg.name} ({count} parameters, {req.dtype}) on "
            f"{gpu.description} ({gpu.memory_gib:g} GiB, {gpu.bandwidth_gbs:,.0f} GB/s, "
            f"{gpu.tflops(req.dtype):g} TFLOPS)",
            f"model parallel {p.mp} ({why_mp}; valid: {', '.join(map(str, p.valid_mp))})",
            "", "per GPU"]
    rows += [f"  {k:<24}{v}   {extra}".rstrip() for k, v, extra in lines]
    rows += [""] + [f"{k:<26}{v}" for k, v in facts]
    rows += ["", "degree  weights/GPU  KV tokens/GPU  sequences  decode floor"]
    for s in p.alternatives:
        mark = "*" if s.mp == p.mp else " "
        rows.append(f"{s.mp:>5}{mark} {_g(s.weights_bytes_per_gpu)}  {s.kv_budget_tokens:>13,}"
                    f"  {s.sequences:>9}  {s.decode_floor_ms:>9.1f} ms")
    rows += ["", f"verdict: {p.verdict}"] + [f"note: {n}" for n in p.notes]
    return "\n".join(rows)


def write_plot(p: CapacityPlan, path: str) -> None:
    """Memory per GPU for each valid degree, and tokens/s against batch size at this one."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    req = p.request
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    fig.suptitle(f"{req.cfg.name}, {req.dtype}, {req.gpu.description}, context {req.seq_len}: "
                 f"{'fits' if p.fits else 'does not fit'} at MP {p.mp}")
    xs = [str(s.mp) for s in p.alternatives]
    parts = (("weights", [s.weights_bytes_per_gpu for s in p.alternatives], "#4c72b0"),
             ("activation workspace", [s.workspace_bytes for s in p.alternatives], "#dd8452"),
             ("reserve", [req.reserve_bytes] * len(xs), "#8c8c8c"),
             ("KV cache", [max(0, s.kv_budget_bytes) for s in p.alternatives], "#55a868"))
    bottom = [0.0] * len(xs)
    for label, values, colour in parts:
        gib = [v / GIB for v in values]
        left.bar(xs, gib, bottom=bottom, label=label, color=colour)
        bottom = [b + g for b, g in zip(bottom, gib)]
    left.axhline(req.gpu.memory_gib, color="black", lw=1, label="GPU memory")
    left.axhline(p.usable_bytes / GIB, color="black", ls="--", lw=1,
                 label=f"utilisation cap ({req.utilisation:g})")
    # Clip the axis a little above the GPU: a 325 GiB bar would flatten everything else.
    ceiling = 1.5 * req.gpu.memory_gib
    for x, s, top in zip(xs, p.alternatives, bottom):
        bold = "bold" if s.mp == p.mp else "normal"
        if top > ceiling:  # an overflowing bar: say how tall it really is, inside it
            left.text(x, ceiling * 0.98, f"no fit\nneeds\n{top:.0f} GiB", ha="center",
                      va="top", fontsize=8, color="white", fontweight=bold)
        else:
            left.text(x, top, f"{s.sequences} seqs" if s.sequences else "no fit",
                      ha="center", va="bottom", fontsize=8, fontweight=bold)
    left.set_ylim(0, ceiling * 1.05)
    left.set(title="memory per GPU (bold: the planned degree)",
             xlabel="model-parallel degree (GPUs per replica)", ylabel="GiB")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)

    most = max(64, 4 * p.sequences)
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                  p.sequences, most) if 1 <= b <= most})
    curve = throughput_curve(p, batches)
    right.plot(batches, [c[1] for c in curve], "--", label="bound (roofline)")
    right.plot(batches, [c[2] for c in curve], "-o", ms=3,
               label=f"estimate ({req.efficiency:.0%} of bound + all-reduce latency)")
    if p.sequences:
        right.axvspan(p.sequences, most, color="red", alpha=0.08,
                      label=f"more than the KV cache holds ({p.sequences} sequences)")
    else:
        right.text(0.97, 0.04, "not even one sequence fits in memory:\nthe curve is "
                   "hypothetical", transform=right.transAxes, ha="right", color="red")
    right.set_xscale("log", base=2)
    right.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.set(title=f"decode throughput per replica at MP {p.mp}, context {req.seq_len}",
              xlabel="batch size (concurrent sequences)", ylabel="tokens/s")
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seq2seq_main(args) -> int:
    """``--model blender-*``: BlenderBot 1 on one GPU (``capacity.seq2seq``)."""
    from .seq2seq import Seq2SeqRequest, format_seq2seq, plan_seq2seq, seq2seq_preset

    try:
        if args.mp not in (None, 1):
            raise CapacityError("BlenderBot 1 runs on one GPU (9.4B is 18.8 GB in fp16): "
                                "--mp does not apply")
        result = plan_seq2seq(Seq2SeqRequest(
            cfg=seq2seq_preset(args.model), gpu=_gpu(args), dtype=args.dtype,
            beams=args.beam_size, context=args.context, reply=args.reply_tokens,
            concurrency=args.concurrency, utilisation=args.utilisation,
            reserve_bytes=int(args.reserve_gib * GIB), efficiency=args.efficiency))
    except (KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"opt-capacity: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_seq2seq(result))
    return EXIT_FITS if result.fits else EXIT_DOES_NOT_FIT


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .seq2seq import is_seq2seq

    if args.model and is_seq2seq(args.model):
        return seq2seq_main(args)
    try:
        result = plan(request_from_args(args))
    except (KeyError, ValueError) as e:  # unknown names; CapacityError and bad figures
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"opt-capacity: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        why = ("given" if args.mp else "the checkpoint's" if args.checkpoint_folder
               else "smallest that fits" if result.smallest_fit else "largest valid; none fits")
        print(format_plan(result, why))
    if args.plot:
        try:
            write_plot(result, args.plot)
            print(f"opt-capacity: wrote {os.path.abspath(args.plot)}", file=sys.stderr)
        except OSError as e:
            print(f"opt-capacity: cannot write the plot {args.plot}: {e.strerror or e}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    return EXIT_FITS if result.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
