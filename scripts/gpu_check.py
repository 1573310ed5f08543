"""Check the CUDA path on a GPU machine: fp16 / bf16 logits against fp32, cached decoding
against a full forward, HF transformers on the same weights, and decode-step timings.

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
    ok = True
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
                  f"{agree:.3f}, paged log-probs vs full {inc_diff:.3g} (largest logit {scale:.3g}): "
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
