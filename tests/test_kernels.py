"""CPU bf16 with oneDNN's packed kernels: the same logits as the plain bf16 model, and close
to fp32 (as scripts/gpu_check.py checks fp16 / bf16 on a GPU)."""

import pytest
import torch

from constants import DEFAULTS
from opt_serving import kernels
from opt_serving.config import DICT_SIZE, get_preset
from opt_serving.decoding.generate import generate
from opt_serving.model import OPTModel, init_random
from opt_serving.distributed import RankEnv
from opt_serving.protocol import SamplingParams
from opt_serving.server.serve import ServeOptions, prepare
from paths import ASSETS

needs_bf16 = pytest.mark.skipif(not kernels.available(torch.bfloat16),
                                reason="this CPU has no bf16 instructions for oneDNN")


def peaked(seed: int = 0) -> OPTModel:
    """Random weights, the final norm scaled so distributions are peaked like a trained
    model's (else argmax comparisons flip on rounding noise)."""
    model = init_random(OPTModel(get_preset("tiny")), seed=seed).eval()
    with torch.no_grad():
        model.decoder.layer_norm.weight.mul_(20)
    return model


@needs_bf16
def test_packed_bf16_equals_plain_bf16_and_stays_close_to_fp32():
    fp32 = peaked()
    plain = peaked().to(torch.bfloat16)
    packed = kernels.pack(peaked().to(torch.bfloat16))
    assert isinstance(packed.decoder.layers[0].fc1, kernels.PackedLinear)
    tokens = torch.randint(4, DICT_SIZE, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, a, b = (m(tokens)[..., :DICT_SIZE].float() for m in (fp32, plain, packed))
    assert torch.equal(b, a)  # the same bf16 products, only faster
    scale = ref.abs().max().item()
    assert (b - ref).abs().max().item() < 0.02 * scale  # bf16's rounding: 0.7 % here
    assert (b.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.95


@needs_bf16
def test_packed_decoding_gives_the_same_tokens_as_plain_bf16():
    plain = peaked(3).to(torch.bfloat16)
    packed = kernels.pack(peaked(3).to(torch.bfloat16))
    options = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    prompts = [[100, 200, 300], [7, 8, 9, 10, 11]]
    ours = [r.generated for r in generate(packed, prompts, options)]
    assert ours == [r.generated for r in generate(plain, prompts, options)]


def test_opt_serve_defaults_to_bf16_only_where_the_packed_kernels_run(serve_checkpoints):
    env = RankEnv(0, 1, 0, "127.0.0.1", 0, "single")
    base = dict(checkpoint=str(serve_checkpoints[1]), constants=DEFAULTS, host="127.0.0.1",
                port=0, assets=str(ASSETS), device="cpu")
    plan, _ = prepare(ServeOptions(**base), env)
    assert plan.dtype == ("bf16" if kernels.available(torch.bfloat16) else "fp32")
    plan, _ = prepare(ServeOptions(**base, dtype="fp32"), env)  # the flag wins
    assert plan.dtype == "fp32"
