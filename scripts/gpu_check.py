"""Check the CUDA path on a GPU machine: the paged-decode kernel against the CPU engine's
attention on 100 random fp16 batches, BlenderBot 1's engine against ParlAI's recorded n-best
lists, greedy ids with CUDA graphs == eager == HF, fp16 / bf16 logits against fp32, cached
decoding against a full forward, and decode-step timings.

    python scripts/gpu_check.py [--preset opt-125m] [--steps 64]

Prints one line per check; exits 1 if a check fails. Never part of the test suite (CI has no
GPU). Random weights: the final layer norm is scaled so distributions are peaked like a
trained model's, otherwise argmax comparisons flip on rounding noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch


from constants import DEFAULTS
from opt_serving.config import DICT_SIZE, get_preset
from opt_serving.runtime.generate import generate
from opt_serving.model import OPTModel, init_random
from opt_serving.protocol import SamplingParams


def _decode_rate(model, batch: int, steps: int) -> float:
    """Generated tokens/s of the engine's own step (``generate``) for ``batch`` 8-token
    prompts, prefill included."""
    prompts = [[5 + i] * 8 for i in range(batch)]
    generate(model, prompts, SamplingParams(max_tokens=4, min_tokens=4, temperature=0))
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, prompts, SamplingParams(max_tokens=steps, min_tokens=steps, temperature=0))
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def check_kernel(cases: int = 100) -> bool:
    """The Triton paged-decode kernel against the CPU path's per-sequence attention."""
    import random

    from opt_serving.attention import paged_decode as pd
    from opt_serving.model import AttentionRows, attend

    if not pd.available(torch.device("cuda")):
        print("paged-decode kernel: triton is not installed: FAIL")
        return False
    rng, worst = random.Random(0), 0.0
    for _ in range(cases):
        heads, dim, bs = rng.choice((2, 12, 32)), rng.choice((64, 80, 128)), 16
        lens = [rng.randint(1, 600) for _ in range(rng.randint(1, 48))]
        blocks = sum(-(-n // bs) for n in lens) + 1
        order = rng.sample(range(blocks), blocks)
        tables, at = [], 0
        for n in lens:
            tables.append(order[at:at + -(-n // bs)])
            at += -(-n // bs)
        k = torch.randn(heads, blocks * bs, dim, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(len(lens), heads, dim, dtype=torch.float16, device="cuda")
        width = max(len(t) for t in tables)
        tt = torch.tensor([[*t, *[0] * (width - len(t))] for t in tables], device="cuda")
        got = pd.paged_decode(q, k, v, tt, torch.tensor(lens, device="cuda"), bs).float()
        rows = AttentionRows.build([n - 1 for n in lens], [1] * len(lens), tables, bs, "cpu")
        ref = torch.empty(heads, len(lens), dim)
        attend(q.float().cpu().transpose(0, 1), k.float().cpu(), v.float().cpu(), rows, ref)
        worst = max(worst, (got.cpu() - ref.transpose(0, 1)).abs().max().item())
    good = worst < 1e-2
    print(f"paged-decode kernel vs the CPU path, {cases} random fp16 batches: max |diff| "
          f"{worst:.3g}: {'ok' if good else 'FAIL'}")
    return good


def check_graphs(model, steps: int = 32) -> bool:
    """Greedy ids with CUDA graphs == eager == HF transformers."""
    prompts = [[5 + i, 100 + 3 * i, 7, 9] for i in range(3)]
    options = SamplingParams(max_tokens=steps, min_tokens=steps, temperature=0)
    graphs = [r.generated for r in generate(model, prompts, options, cuda_graphs=True)]
    eager = [r.generated for r in generate(model, prompts, options, cuda_graphs=False)]
    good = graphs == eager
    try:
        from opt_serving.testing.hf_twin import hf_twin

        hf = hf_twin(model.float().cpu()).to("cuda", torch.float16).eval()
        model.to("cuda", torch.float16)
        theirs = []
        for p in prompts:
            out = hf.generate(torch.tensor([[2, *p]], device="cuda"), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=1)
            theirs.append(tuple(out[0, len(p) + 1:].tolist()))
        agree = sum(a == b for a, b in zip(theirs, graphs))
        print(f"{'':15s} HF greedy ids equal ours for {agree}/{len(prompts)} prompts")
        good &= agree == len(prompts)
    except ImportError:
        print("transformers not installed: HF ids skipped")
    print(f"{'':15s} greedy ids, {steps} steps: CUDA graphs == eager: "
          f"{'ok' if graphs == eager else 'FAIL'}")
    return good


def check_blenderbot() -> bool:
    """BlenderBot 1's engine on CUDA: the tiny models ParlAI trained must give ParlAI's
    recorded n-best lists in fp32 (both fork layouts), and fp16 its best replies."""
    import json
    from pathlib import Path

    from opt_serving.blenderbot import parlai
    from opt_serving.blenderbot.engine import BeamEngine

    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "blenderbot1"
    ok = True
    for folder, recording in (("tiny", "parlai_1.7.2.json"), ("tiny-xlm", "parlai_1.7.2_xlm.json")):
        files = parlai.load(fixtures / folder / "model")
        recorded = json.loads((fixtures / recording).read_text())
        options = parlai.search_options({**files.opt, **recorded["opt"]})
        turns = [t for c in recorded["conversations"] for t in c["turns"]]
        for dtype, forking in ((torch.float32, "share"), (torch.float32, "copy"),
                               (torch.float16, "share")):
            model = files.model.to("cuda", dtype)
            engine = BeamEngine(model, max_groups=3, max_tokens=options.max_tokens,
                                forking=forking)
            got = engine.run([t["history_vec"] for t in turns], options)
            if dtype == torch.float32:
                same = all([list(h.tokens) for h in r] == [h["tokens"][1:-1] for h in t["nbest"]]
                           for r, t in zip(got, turns))
            else:  # fp16 rounding may reorder near n-best entries: the best reply must hold
                same = all(list(r[0].tokens) == t["best"][1:-1] for r, t in zip(got, turns))
            ok &= same
            print(f"blenderbot {folder} {str(dtype):13s} {forking}: "
                  f"{'ok' if same else 'FAIL'} ({len(turns)} recorded turns)")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="opt-125m")
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    cfg = get_preset(args.preset)
    ref = init_random(OPTModel(cfg), seed=0).eval()
    with torch.no_grad():
        ref.decoder.layer_norm.weight.mul_(20)
    tokens = torch.randint(4, DICT_SIZE, (4, 48), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 2
    ok = check_kernel()
    ok &= check_blenderbot()
    for preset in ("opt-125m", "opt-1.3b"):
        graph_model = init_random(OPTModel(get_preset(preset)), seed=0).eval()
        with torch.no_grad():
            graph_model.decoder.layer_norm.weight.mul_(20)
        print(preset)
        ok &= check_graphs(graph_model.to("cuda", torch.float16))
        del graph_model
    with torch.inference_mode():
        cpu = ref(tokens)[..., :DICT_SIZE].float()
        scale = cpu.abs().max().item()  # tolerances are relative to the largest logit
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
            model = init_random(OPTModel(cfg), seed=0)
            model.load_state_dict(ref.state_dict())
            model = model.to("cuda", dtype).eval()
            gpu = model(tokens.cuda())[..., :DICT_SIZE].float().cpu()
            diff = (gpu - cpu).abs().max().item()
            agree = (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item()
            # The engine's path (packed steps, paged KV cache, prompts in 16-token chunks)
            # must score the prompt as the full forward does.
            res = generate(model, tokens[:, 1:].tolist(), SamplingParams(max_tokens=0, echo=True),
                           limits=dataclasses.replace(DEFAULTS, max_batch_tokens=16))
            paged = torch.tensor([r.prompt_logprobs for r in res])  # (4, 47)
            full = torch.log_softmax(gpu[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
            inc_diff = (paged - full).abs().max().item()
            good = diff < tol * scale and agree > 0.97 and inc_diff < tol * scale
            ok &= good
            print(f"{str(dtype):15s} max |logit - cpu fp32| {diff:.3g}, argmax agreement "
                  f"{agree:.3f}, paged log-probs vs full {inc_diff:.3g} (largest logit "
                  f"{scale:.3g}): "
                  f"{'ok' if good else 'FAIL'}")
            for batch in (1, 16):
                rate = _decode_rate(model, batch, args.steps)
                print(f"{'':15s} decode batch {batch:2d}: {rate:8.0f} tokens/s")
        try:
            from opt_serving.testing.hf_twin import hf_twin

            hf = hf_twin(ref).to("cuda", torch.float16)
            theirs = hf(tokens.cuda()).logits[..., :DICT_SIZE].float().cpu()
            ours = ref.to("cuda", torch.float16)(tokens.cuda())[..., :DICT_SIZE].float().cpu()
            diff = (theirs - ours).abs().max().item()
            print(f"HF transformers fp16 on cuda vs ours: max |logit difference| {diff:.3g}")
        except ImportError:
            print("transformers not installed: HF comparison skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
