"""Benchmark opt-serve on CPU with an opt-125m-shaped model (random weights, fp32).

Prints, in one run, as ratios:
  1. batch-1 decode tokens/s of the server against HF transformers' ``generate`` on the same
     weights (target >= 1.0);
  2. 16 concurrent clients x 64-token completions: throughput against the same requests sent
     one by one (target >= 4x) and against a metaseq-style static batcher (collect requests
     for 100 ms, run them as one padded batch to completion; implemented below over the same
     model, called in-process, so it pays no HTTP cost) (target >= 1.5x); then the same with
     completion lengths from 8 to 64 tokens (as stop sequences make them in practice), where a
     static batch keeps computing finished rows and holds new requests back;
  3. achieved memory bandwidth at batch 1 (weight bytes x decode steps/s) against this
     machine's measured copy bandwidth;
  4. p50 / p99 latency that HTTP and scheduling add to a max_tokens=1 request (end-to-end
     minus the time the server itself spent in model forwards for it).
Writes bench.json and bench.png to --out. All decoding is greedy, on both sides of every
comparison. Other processes on the machine skew the figures: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[1]

from opt_serving.testing import synthetic  # noqa: E402
from opt_serving.checkpoint.loading import load_model  # noqa: E402
from opt_serving.config import DICT_SIZE, get_preset  # noqa: E402
from opt_serving.testing.hf_twin import hf_twin  # noqa: E402
from opt_serving.model import KVCache  # noqa: E402
from opt_serving.testing.server_process import ServerProcess  # noqa: E402

CLIENTS, TOKENS, REQUESTS_PER_CLIENT = 16, 64, 2
WINDOW_S = 0.1


def prompt_ids(i: int, length: int = 16) -> list[int]:
    return [(1000 + 37 * i + 11 * j) % 50000 + 4 for j in range(length)]


def hf_decode_rate(model, steps: int) -> float:
    hf = hf_twin(model)
    prompt = torch.tensor([[2, *prompt_ids(0)]])
    kw = dict(do_sample=False, pad_token_id=1)
    with torch.no_grad():
        hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, **kw)
        total = time.perf_counter() - t0
    return (steps - 1) / (total - prefill)


def server_decode_rate(server: ServerProcess, steps: int) -> float:
    """Tokens/s between the first and the last streamed token of one request."""
    body = {"prompt": prompt_ids(0), "max_tokens": steps, "min_tokens": steps,
            "temperature": 0, "stream": True}
    server.post("/v1/completions", {**body, "max_tokens": 4, "min_tokens": 4})  # warm-up
    stamps = []
    with requests.post(server.url + "/v1/completions", json=body, stream=True) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class StaticBatcher:
    """metaseq's batching: wait WINDOW_S for requests, run them as one right-padded batch to
    completion (every row until the longest finishes), then look at the queue again."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len = model, max_len
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, ids: list[int], max_tokens: int) -> Future:
        fut: Future = Future()
        self.inbox.put((ids, max_tokens, fut))
        return fut

    def _loop(self) -> None:
        while True:
            batch = [self.inbox.get()]
            deadline = time.monotonic() + WINDOW_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
            for fut, out in zip([b[2] for b in batch], self._run(batch)):
                fut.set_result(out)

    @torch.inference_mode()
    def _run(self, batch) -> list[list[int]]:
        prompts = [[2, *ids] for ids, _, _ in batch]
        steps = max(m for _, m, _ in batch)
        b, t = len(prompts), max(len(p) for p in prompts)
        cache = KVCache(self.model.cfg, b, self.max_len)
        slots = torch.arange(b)
        tokens = torch.tensor([p + [1] * (t - len(p)) for p in prompts])
        lens = torch.tensor([len(p) for p in prompts])
        logits = self.model(tokens, start=torch.zeros(b, dtype=torch.long), cache=cache,
                            slots=slots, select=(lens - 1)[:, None])[:, 0]
        out = []
        for step in range(steps):
            nxt = logits[:, :DICT_SIZE].argmax(-1)
            out.append(nxt)
            if step + 1 < steps:
                logits = self.model(nxt[:, None], start=lens + step, cache=cache,
                                    slots=slots)[:, 0]
        gen = torch.stack(out, 1).tolist()
        return [g[:m] for g, (_, m, _) in zip(gen, batch)]


def fixed_length(k: int) -> int:
    return TOKENS


def mixed_length(k: int) -> int:
    return 8 + (37 * k) % (TOKENS - 7)  # 8 .. 64, the same sequence for both systems


def run_clients(send, offsets: list[float]) -> float:
    """Each client starts at its offset and sends REQUESTS_PER_CLIENT requests back to back;
    returns generated tokens per second over the whole run."""
    def client(i: int) -> int:
        time.sleep(offsets[i])
        return sum(send(CLIENTS * r + i) for r in range(REQUESTS_PER_CLIENT))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(client, range(CLIENTS)))
    return tokens / (time.perf_counter() - t0)


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes read plus written per second by a large tensor copy (best of 5)."""
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def latency_overhead(server: ServerProcess, n: int = 100) -> list[float]:
    """Seconds that HTTP, scheduling and sampling add to max_tokens=1 requests: each
    end-to-end time minus the time the server spent in model forwards for it (its
    opt_serve_forward_seconds counter, read between requests), sorted."""
    ids = prompt_ids(3)
    added = []
    for _ in range(n):
        before = server.metric("opt_serve_forward_seconds_total")
        t0 = time.perf_counter()
        server.post("/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0})
        e2e = time.perf_counter() - t0
        added.append(e2e - (server.metric("opt_serve_forward_seconds_total") - before))
    return sorted(added)


def plot(figures: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["decode vs HF", "concurrent vs one-by-one", "concurrent vs static batch",
             "same, lengths 8..64", "bandwidth / copy bw"]
    values = [figures[k] for k in ("decode_vs_hf", "concurrent_vs_sequential",
                                   "concurrent_vs_static", "mixed_concurrent_vs_static",
                                   "bandwidth_fraction")]
    targets = [1.0, 4.0, 1.5, 1.5, None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(names, values, color="tab:blue")
    for i, t in enumerate(targets):
        if t:
            a.hlines(t, i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed")
    a.set_ylabel("ratio (red: target)")
    a.tick_params(axis="x", labelrotation=20)
    b.bar(["p50", "p99"], [figures["added_latency_p50_ms"], figures["added_latency_p99_ms"]])
    b.set_ylabel("ms added by HTTP + scheduling (max_tokens 1)")
    fig.suptitle(f"opt-serve, {figures['model']} fp32, CPU x{figures['cpus']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--decode-steps", type=int, default=96)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_mp_parts(tmp, cfg, synthetic.random_state(cfg, seed=0), 1)
        model, _ = load_model(tmp, dtype=torch.float32)
        server = ServerProcess("--checkpoint-folder", tmp, "--device", "cpu", "--kv-tokens",
                               "4096", "--max-seq-len", "128", "--demo-tokenizer")
        try:
            ours = server_decode_rate(server, args.decode_steps)
            offsets = [i * 0.125 for i in range(CLIENTS)]  # arrivals spread over 2 s

            def via_http(k: int, length=fixed_length) -> int:
                n = length(k)
                r = server.post("/completions", {"prompt": prompt_ids(k), "temperature": 0,
                                                 "max_tokens": n, "min_tokens": n})
                return len(r.json()["choices"][0]["logprobs"]["tokens"])
            concurrent = run_clients(via_http, offsets)
            mixed = run_clients(lambda k: via_http(k, mixed_length), offsets)
            t0 = time.perf_counter()
            sequential = sum(via_http(k) for k in range(4)) / (time.perf_counter() - t0)
            added = latency_overhead(server)
        finally:
            server.stop()
        batcher = StaticBatcher(model, max_len=128)
        static = run_clients(lambda k: len(batcher.submit(prompt_ids(k), TOKENS).result()),
                             offsets)
        static_mixed = run_clients(
            lambda k: len(batcher.submit(prompt_ids(k), mixed_length(k)).result()), offsets)
        hf = hf_decode_rate(model, args.decode_steps)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    copy_bw = copy_bandwidth()
    figures = {
        "model": args.model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "decode_tokens_per_s": ours, "hf_generate_tokens_per_s": hf, "decode_vs_hf": ours / hf,
        "concurrent_tokens_per_s": concurrent, "sequential_tokens_per_s": sequential,
        "static_batch_tokens_per_s": static, "concurrent_vs_sequential": concurrent / sequential,
        "concurrent_vs_static": concurrent / static,
        "mixed_lengths_tokens_per_s": mixed, "static_mixed_tokens_per_s": static_mixed,
        "mixed_concurrent_vs_static": mixed / static_mixed,
        "achieved_bandwidth_gb_s": weight_bytes * ours / 1e9,
        "copy_bandwidth_gb_s": copy_bw / 1e9,
        "bandwidth_fraction": weight_bytes * ours / copy_bw,
        "added_latency_p50_ms": added[len(added) // 2] * 1e3,
        "added_latency_p99_ms": added[int(0.99 * (len(added) - 1))] * 1e3,
        "workload": f"{CLIENTS} clients arriving 125 ms apart, {REQUESTS_PER_CLIENT} requests "
                    f"each back to back, {TOKENS} greedy tokens per request",
    }
    (out / "bench.json").write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, out / "bench.png")
    print(f"1. batch-1 decode: {ours:.1f} tok/s vs HF generate {hf:.1f} tok/s -> "
          f"{ours / hf:.2f}x (target >= 1.0)")
    print(f"2. {CLIENTS} clients x {TOKENS} tokens: {concurrent:.1f} tok/s; vs one by one "
          f"({sequential:.1f}) {concurrent / sequential:.2f}x (target >= 4); vs static 100 ms "
          f"batch ({static:.1f}) {concurrent / static:.2f}x (target >= 1.5)")
    print(f"   lengths 8..64: {mixed:.1f} tok/s vs static 100 ms batch ({static_mixed:.1f}) "
          f"{mixed / static_mixed:.2f}x")
    print(f"3. bandwidth at batch 1: {weight_bytes * ours / 1e9:.2f} GB/s of weights vs copy "
          f"{copy_bw / 1e9:.2f} GB/s (read + write) -> {weight_bytes * ours / copy_bw:.2f}")
    print(f"4. max_tokens 1: HTTP + scheduling + sampling add "
          f"{figures['added_latency_p50_ms']:.1f} ms (p50), "
          f"{figures['added_latency_p99_ms']:.1f} ms (p99) to the model's forward time")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
