"""CPU kernels with oneDNN's packed weights (bf16 on CPUs with bf16 instructions, fp32 on
the others): the same logits as the plain model (bf16) or within fp32 rounding of it, close
to fp32 (as scripts/gpu_check.py checks fp16 / bf16 on a GPU), and a sequence's results the
same whatever else is in the step."""

import pytest
import torch

from constants import DEFAULTS
from opt_serving import kernels
from opt_serving.config import DICT_SIZE, get_preset
from opt_serving.runtime.generate import generate
from opt_serving.model import OPTModel, init_random
from opt_serving.distributed import RankEnv
from opt_serving.protocol import SamplingParams
from opt_serving.runtime.startup import ServeOptions, prepare
from paths import ASSETS

needs_bf16 = pytest.mark.skipif(not kernels.available(torch.bfloat16),
                                reason="this CPU has no bf16 instructions for oneDNN")
# The dtypes ``pack`` serves on this CPU: fp32 or bf16, whichever measured faster packed.
packed_dtypes = pytest.mark.parametrize("dtype", [
    pytest.param(d, marks=pytest.mark.skipif(not kernels.available(d),
                                             reason=f"{d} is not packed on this CPU"))
    for d in (torch.float32, torch.bfloat16)])


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


@pytest.mark.skipif(not torch.cpu.get_capabilities().get("avx2"), reason="not an x86 CPU")
def test_packed_fp32_stays_within_fp32_rounding_of_the_plain_model():
    # Packed on any x86 CPU, so that this runs on the AMX ones too (opt-serve packs fp32
    # only on CPUs without bf16 instructions, where it measured faster).
    plain = peaked()
    packed = kernels.pack(peaked())
    tokens = torch.randint(4, DICT_SIZE, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, ours = (m(tokens)[..., :DICT_SIZE] for m in (plain, packed))
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@packed_dtypes
def test_packed_decoding_gives_the_same_tokens_as_the_plain_model(dtype):
    plain = peaked(3).to(dtype)
    packed = kernels.pack(peaked(3).to(dtype))
    options = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    prompts = [[100, 200, 300], [7, 8, 9, 10, 11]]
    ours = [r.generated for r in generate(packed, prompts, options)]
    assert ours == [r.generated for r in generate(plain, prompts, options)]


@pytest.mark.skipif(not kernels.available(torch.float32),
                    reason="fp32 is not packed on this CPU")
def test_a_sequence_decodes_the_same_alone_and_in_a_batch():
    # One packed step holds one row per decoding sequence plus the prompt chunks: with fp32
    # packed (AVX2 CPUs) a sequence's log-probs do not depend on how many rows that is. (bf16
    # packed on an AMX Xeon was measured so at the layer level; fp32 packed there was not.)
    model = kernels.pack(peaked(5))
    options = SamplingParams(max_tokens=12, min_tokens=12, temperature=0, logprobs=1)
    gen = torch.Generator().manual_seed(2)
    others = [torch.randint(4, DICT_SIZE, (n,), generator=gen).tolist() for n in (3, 40, 9)]
    alone = generate(model, [[100, 200, 300, 400]], options)[0]
    for batch in ([[100, 200, 300, 400]] + others[:1], [[100, 200, 300, 400]] + others):
        together = generate(model, batch, options)[0]
        assert together.generated == alone.generated
        assert together.logprobs == alone.logprobs  # bit for bit


def test_opt_serve_defaults_to_bf16_only_where_the_packed_kernels_run(serve_checkpoints):
    env = RankEnv(0, 1, 0, "127.0.0.1", 0, "single")
    base = dict(checkpoint=str(serve_checkpoints[1]), constants=DEFAULTS, host="127.0.0.1",
                port=0, assets=str(ASSETS), device="cpu")
    plan, _ = prepare(ServeOptions(**base), env)
    assert plan.dtype == ("bf16" if kernels.available(torch.bfloat16) else "fp32")
    plan, _ = prepare(ServeOptions(**base, dtype="fp32"), env)  # the flag wins
    assert plan.dtype == "fp32"
