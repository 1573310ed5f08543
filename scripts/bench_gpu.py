"""Benchmark the engine on a GPU against HF transformers on the same random weights and dtype.

    python scripts/bench_gpu.py                       # OPT-1.3B and OPT-6.7B, fp16, on cuda
    python scripts/bench_gpu.py --models tiny --device cpu --batches 1 2 --new 4   # smoke run

For each model: decode tokens/s at each batch (128-token prompts, greedy, 128 new tokens, 64
at batch 256) for ours with CUDA graphs, ours eager, HF ``generate`` eager and HF
``generate(cache_implementation="static")``; ms per decode step (median, p90); the fraction of
the memory bound (weights + the KV read per step over a copy bandwidth measured here); the
share of each step the GPU is busy (CUDA events around the forward); graph capture time and
memory; the time to the first token of a 2,000-token prompt (one chunk and 512-token chunks).
``--http`` also serves the first model with opt-serve and drives it with as many clients as
the batch. Everything runs interleaved in one process; writes bench_gpu.json and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from constants import DEFAULTS
from opt_serving.config import DTYPES, get_preset
from opt_serving.decoding.step import Stepper
from opt_serving.model import OPTModel, init_random
from opt_serving.protocol import SamplingParams
from opt_serving.runtime.builder import build_runner, build_scheduler
from opt_serving.runtime.graphs import GraphRunner
from opt_serving.runtime.sizing import CacheLayout


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted once each, as streaming the
    weights reads them once)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * 5 / (time.perf_counter() - started)


def decode(model, batch: int, prompt: int, new: int, graphs: bool) -> dict:
    """Our engine's step loop in-process: prefill, then ``new`` timed decode steps."""
    device = next(model.parameters()).device
    limits = dataclasses.replace(DEFAULTS, max_seq_len=min(2048, prompt + new + 2),
                                 default_max_tokens=1)
    bs = limits.kv_block_size
    layout = CacheLayout(batch * -(-(prompt + new + 1) // bs), bs)
    t0 = time.perf_counter()
    runner = build_runner(model, layout, limits, cuda_graphs=graphs, rows=batch)
    capture_s = time.perf_counter() - t0 if isinstance(runner, GraphRunner) else 0.0
    scheduler = build_scheduler(limits, layout)
    busy = []

    def forward(work):
        if device.type != "cuda":
            return runner.run(work)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = runner.run(work)
        end.record()
        busy.append((start, end))
        return out

    stepper = Stepper(scheduler, forward, lambda _: b"")
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(4, 50000, (batch, prompt), generator=gen).tolist()
    scheduler.submit(prompts, SamplingParams(max_tokens=new, min_tokens=new,
                                             temperature=0).seeded())
    with torch.inference_mode():
        while any(s.cached < len(s.prompt) for s in scheduler.waiting + scheduler.running):
            stepper.step(stepper.plan())
        busy.clear()
        times = []
        while not scheduler.idle:
            sync(device)
            t = time.perf_counter()
            stepper.step(stepper.plan())
            sync(device)
            times.append(time.perf_counter() - t)
    gpu = [s.elapsed_time(e) / 1e3 for s, e in busy]
    total = sum(times)
    return {"tok_s": batch * len(times) / total, "ms_median": 1e3 * statistics.median(times),
            "ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
            "gpu_busy": sum(gpu) / total if gpu else None, "capture_s": capture_s,
            "replays": getattr(runner, "replays", 0)}


def hf_decode(hf, batch: int, prompt: int, new: int, static: bool) -> float:
    device = hf.device
    ids = torch.randint(4, 50000, (batch, prompt), device=device)
    ids[:, 0] = 2
    kw = dict(do_sample=False, pad_token_id=1, min_new_tokens=new, max_new_tokens=new)
    if static:
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        hf.generate(ids, **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})  # warm up
        hf.generate(ids[:, :8], **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})
        sync(device)
        t = time.perf_counter()
        hf.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
        sync(device)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, **kw)
        sync(device)
    return batch * (new - 1) / max(1e-9, time.perf_counter() - t - prefill)


def ttft(model, tokens: int, chunk: int) -> float:
    from opt_serving.runtime.generate import generate

    limits = dataclasses.replace(DEFAULTS, max_batch_tokens=chunk)
    prompt = torch.randint(4, 50000, (tokens,), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    generate(model, [prompt.tolist()], SamplingParams(max_tokens=1, temperature=0),
             limits=limits)
    sync(device)
    t = time.perf_counter()
    generate(model, [prompt.tolist()], SamplingParams(max_tokens=1, temperature=0),
             limits=limits)
    sync(device)
    return time.perf_counter() - t


def http_rates(model_cfg, state, batches, prompt: int, new: int, dtype: str) -> dict:
    """opt-serve over HTTP with ``batch`` concurrent clients each asking ``new`` tokens."""
    import requests

    from opt_serving.testing import synthetic
    from opt_serving.testing.server_process import ServerProcess
    from reshard.core import reshard

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_consolidated(Path(tmp) / "c.pt", model_cfg, state)
        folder = reshard([str(Path(tmp) / "c.pt")], 1, Path(tmp) / "mp1", progress=False)
        proc = ServerProcess("--checkpoint-folder", str(folder.output_dir), "--dtype", dtype,
                             "--demo-tokenizer", "--max-seq-len", "1024",
                             start_timeout=600.0)
        try:
            for batch in batches:
                body = {"prompt": list(range(4, 4 + prompt)), "max_tokens": new,
                        "min_tokens": new, "temperature": 0}
                one = lambda _: requests.post(proc.url + "/completions", json=body,  # noqa
                                              timeout=600).raise_for_status()
                with ThreadPoolExecutor(batch) as pool:
                    list(pool.map(one, range(batch)))  # warm up
                    t = time.perf_counter()
                    list(pool.map(one, range(batch)))
                out[batch] = batch * new / (time.perf_counter() - t)
        finally:
            proc.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["opt-1.3b", "opt-6.7b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--http", action="store_true", help="also measure opt-serve over HTTP")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "torch": torch.__version__, "models": {}}
    bandwidth = copy_bandwidth(device, 256 << 20 if device.type == "cpu" else 2 << 30)
    results["copy_bandwidth_gbs"] = bandwidth / 1e9
    print(f"{results['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for name in args.models:
        cfg = get_preset(name)
        model = init_random(OPTModel(cfg), seed=0).eval()
        with torch.no_grad():
            model.decoder.layer_norm.weight.mul_(20)  # peaked, like a trained model
        state = {k: v.to(DTYPES[args.dtype]) for k, v in model.state_dict().items()}
        model = model.to(device, DTYPES[args.dtype])
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        hf = None
        if not args.no_hf:
            from opt_serving.testing.hf_twin import hf_twin

            hf = hf_twin(model.float().cpu()).to(device, DTYPES[args.dtype]).eval()
            model = model.to(device, DTYPES[args.dtype])
        rows = {}
        for batch in args.batches:
            new = args.new if batch < 256 else args.new // 2
            kv_read = batch * (args.prompt + new / 2) * 2 * cfg.num_layers * cfg.embed_dim * 2
            bound = batch * bandwidth / (weights + kv_read)
            row = {"bound_tok_s": bound}
            for label, graphs in (("graphs", device.type == "cuda"), ("eager", False)):
                r = decode(model, batch, args.prompt, new, graphs)
                r["of_bound"] = r["tok_s"] / bound
                row[label] = r
            if hf is not None:
                row["hf_eager"] = hf_decode(hf, batch, args.prompt, new, static=False)
                if device.type == "cuda":
                    try:
                        row["hf_static"] = hf_decode(hf, batch, args.prompt, new, static=True)
                    except Exception as e:  # noqa: BLE001 - report, keep measuring
                        row["hf_static"] = f"failed: {type(e).__name__}: {e}"[:200]
            rows[batch] = row
            print(f"{name} b{batch}: " + json.dumps(row, default=str), flush=True)
        prefill = {chunk: ttft(model, 2000, chunk) for chunk in (3072, 512)}
        print(f"{name} 2000-token prefill: one chunk {prefill[3072] * 1e3:.1f} ms, 512-token "
              f"chunks {prefill[512] * 1e3:.1f} ms", flush=True)
        results["models"][name] = {"weights_gb": weights / 1e9, "decode": rows,
                                   "prefill_2000_s": prefill}
        if args.http and name == args.models[0]:
            results["models"][name]["http_tok_s"] = http_rates(
                cfg, state, args.batches, args.prompt, args.new, args.dtype)
            print(f"{name} over HTTP: {results['models'][name]['http_tok_s']}", flush=True)
        del model, hf
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, args.out / "bench_gpu.png")
    print(f"wrote {args.out / 'bench_gpu.json'} and {args.out / 'bench_gpu.png'}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        batches = sorted(m["decode"], key=int)
        for key, style in (("graphs", "-o"), ("eager", "--o"), ("hf_eager", ":s"),
                           ("hf_static", "-.s"), ("bound_tok_s", "-")):
            ys = [m["decode"][b].get(key) for b in batches]
            ys = [y["tok_s"] if isinstance(y, dict) else y for y in ys]
            if all(isinstance(y, (int, float)) for y in ys):
                ax.plot([int(b) for b in batches], ys, style, label=key)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s",
               title=f"{name} ({results['device']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
