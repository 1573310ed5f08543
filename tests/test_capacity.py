"""The capacity planner against the published figures (../shared/reference/capacity.md), the
model it plans for, and the ``opt-capacity`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from opt_serving.capacity.planner import (DTYPES, CapacityError, CapacityRequest, decode_step_seconds,
                                  get_dtype, kv_bytes_per_token_per_gpu, kv_cache_tokens, plan,
                                  prefill_flops, weight_bytes_per_gpu, workspace)
from opt_serving.capacity.cli import main
from opt_serving.config import PRESETS
from opt_serving.capacity.gpus import CATALOGUE, GB, GIB, custom_gpu, get_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP16 = DTYPES["fp16"]
KIB, MIB = 1024, 1024 ** 2


def near(value: float, published: float, tol: float = 0.02) -> bool:
    return abs(value / published - 1) <= tol


def weights_gib(model: str, mp: int = 1) -> float:
    return weight_bytes_per_gpu(PRESETS[model], mp, FP16) / GIB


def plan_for(model: str, gpu: str, mp: int | None = None, **kw):
    return plan(CapacityRequest(PRESETS[model], get_gpu(gpu), mp=mp, **kw))


# -- the OPT table ---------------------------------------------------------------------------

# model: (params in billions, KV per token in bytes, fp16, all layers), from capacity.md
OPT_TABLE = {
    "opt-125m": (0.125, 36 * KIB), "opt-1.3b": (1.316, 192 * KIB),
    "opt-2.7b": (2.652, 320 * KIB), "opt-6.7b": (6.658, 512 * KIB),
    "opt-13b": (12.85, 800 * KIB), "opt-30b": (29.97, 1.3125 * MIB),
    "opt-66b": (65.72, 2.25 * MIB), "opt-175b": (174.6, 4.5 * MIB),
}


@pytest.mark.parametrize("name", OPT_TABLE)
def test_opt_table(name):
    cfg = PRESETS[name]
    params, kv = OPT_TABLE[name]
    assert near(cfg.param_count() / 1e9, params, 0.01)
    assert kv_bytes_per_token_per_gpu(cfg, 1, 2) == kv
    # Weights at fp16 are exactly two bytes per parameter; the table's "GB" is decimal.
    assert weight_bytes_per_gpu(cfg, 1, FP16) == 2 * cfg.param_count()


def test_valid_degrees():
    assert PRESETS["opt-30b"].valid_mp_degrees() == [1, 2, 4, 8]
    assert PRESETS["opt-66b"].valid_mp_degrees() == [1, 2, 4, 8]
    assert PRESETS["opt-175b"].valid_mp_degrees() == [1, 2, 4, 8, 16, 32]


def test_every_preset_matches_the_model_built_from_it():
    from opt_serving.model import OPTModel
    for cfg in PRESETS.values():
        with torch.device("meta"):  # shapes only: OPT-175B costs no memory
            model = OPTModel(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.param_count(), cfg.name


def test_per_rank_weights_add_up():
    """M ranks hold the model once plus M - 1 extra copies of the replicated tensors."""
    cfg = PRESETS["tiny-4l"]
    d = cfg.embed_dim
    # positions, final LN, and per layer two LNs (4d) plus the out_proj and fc2 biases (2d)
    replicated = (cfg.position_rows * d + 2 * d + cfg.num_layers * 6 * d) * 2
    whole = weight_bytes_per_gpu(cfg, 1, FP16)
    for mp in (2, 4, 8):
        assert mp * weight_bytes_per_gpu(cfg, mp, FP16) == whole + (mp - 1) * replicated
    # checkpoints.md: "30B at MP8 per-rank fp16: 7.5 GB; 175B at MP16: 21.9 GB"
    assert near(weight_bytes_per_gpu(PRESETS["opt-30b"], 8, FP16) / GB, 7.5)
    assert near(weight_bytes_per_gpu(PRESETS["opt-175b"], 16, FP16) / GB, 21.9)


# -- published figures -----------------------------------------------------------------------


def test_bb3_30b_needs_56gb():
    # ParlAI's "56gb" is the fp16 weights alone, in GiB: 29.97 B x 2 B = 59.9 GB = 55.8 GiB.
    assert near(weights_gib("bb3-30b"), 56)
    assert round(weights_gib("bb3-30b"), 1) == 55.8
    p = plan_for("bb3-30b", "a100-40g", mp=1)
    assert not p.fits
    assert p.verdict.startswith("does not fit: weights need 55.8 GiB per GPU, 40 GiB available")


def test_bb3_175b_needs_384gb():
    # 384 GiB = 8 x 48 GiB (A6000 / A40 class): 325 GiB of weights + 18 % left over, which
    # under a 0.9 cap leaves room for barely one 2048-token conversation.
    weights = weights_gib("bb3-175b")
    assert near(weights, 325.2, 0.002)
    assert near(384 / weights, 1.18)
    gpu48 = custom_gpu(48, 696, 150)
    tight = plan(CapacityRequest(PRESETS["bb3-175b"], gpu48, mp=8))
    assert tight.weights_bytes_per_gpu < 48 * GIB * 0.9 and tight.sequences <= 1
    no_reserve = plan(CapacityRequest(PRESETS["bb3-175b"], gpu48, mp=8, reserve_bytes=0))
    assert no_reserve.sequences == 1


def test_blenderbot_2_7b_and_9_4b_recipes_assume_fp32():
    # Not OPT shapes (BlenderBot 1 is an encoder-decoder), so only the parameter counts:
    # at fp32, 2.7 B (10.1 GiB) fits a 16 GB P100 and 9.4 B (35 GiB) needs two 32 GB V100s.
    # At fp16 9.4 B would fit one V100-32GB, so the recipe's "at least two" implies fp32.
    fp32 = get_dtype("fp32").weight_bytes
    v100 = get_gpu("v100-32g").memory_bytes * 0.9
    assert 2.7e9 * fp32 < 16 * GIB * 0.9
    assert 9.4e9 * fp32 > v100 and 9.4e9 * fp32 / 2 < v100
    assert 9.4e9 * 2 < v100


def test_bb3_30b_four_ways_does_not_fit_t4():
    # metaseq #425: "14.3 GB per part". Our tensors come to 13.98 GiB per rank (15.0 GB): the
    # figure is 2.2 % above the GiB reading; a part file also carries a pickled cfg and, in
    # some exports, an untied output projection (0.17 GiB per rank). The verdict reproduces.
    assert near(weights_gib("bb3-30b", 4), 14.3, 0.025)
    p = plan_for("bb3-30b", "t4", mp=4)
    assert not p.fits and p.kv_budget_tokens < 2048
    assert plan_for("bb3-30b", "t4").mp == 8  # the smallest degree that does fit


# vLLM paper, Table 1: (model, GPU, degree, parameters GB, KV cache GB, token slots).
VLLM_TABLE = [("opt-13b", "a100-40g", 1, 26, 12, 15.7e3),
              ("opt-66b", "a100-40g", 4, 132, 21, 9.7e3),
              ("opt-175b", "a100-80g", 8, 346, 264, 60.1e3)]


@pytest.mark.parametrize("model,gpu,mp,params_gb,kv_gb,slots", VLLM_TABLE)
def test_vllm_paper_kv_slots(model, gpu, mp, params_gb, kv_gb, slots):
    cfg = PRESETS[model]
    # Unit convention that reproduces the paper: parameter sizes are decimal GB (2 B x
    # params / 1e9: 25.7, 131.4, 349.2), while the KV cache "GB" is GiB and KV per token is
    # binary (800 KiB, 2.25 MiB, 4.5 MiB): 12 GiB / 800 KiB = 15,729 slots. Reading the KV
    # figures as decimal GB instead gives 14.6K, 8.9K and 56K, 7-8 % short of the table.
    assert near(weight_bytes_per_gpu(cfg, 1, FP16) / GB, params_gb)
    per_gpu_kv = kv_gb * GIB // mp  # the cache is spread evenly over the M ranks
    tokens = per_gpu_kv // kv_bytes_per_token_per_gpu(cfg, mp, 2)
    assert near(tokens, slots)
    # And the planner agrees these setups serve at least one full-context sequence.
    assert plan_for(model, gpu, mp=mp).fits


def test_opt_175b_does_not_fit_8x40gb():
    assert near(weight_bytes_per_gpu(PRESETS["opt-175b"], 1, FP16) / GB, 350)
    p = plan_for("opt-175b", "a100-40g", mp=8)
    assert not p.fits
    assert p.verdict.startswith("does not fit: weights need 40.7 GiB per GPU, 40 GiB available")
    assert plan_for("opt-175b", "a100-40g").mp == 16


@pytest.mark.parametrize("model,gpu,mp,ms", [
    ("opt-175b", "a100-80g", 8, 21.4), ("opt-175b", "h100-sxm", 8, 13.0),
    ("opt-175b", "a100-80g", 16, 10.7), ("opt-30b", "a100-80g", 8, 3.7),
    ("opt-30b", "a100-80g", 2, 14.7)])
def test_decode_bandwidth_bounds(model, gpu, mp, ms):
    assert near(plan_for(model, gpu, mp=mp).decode_floor_ms, ms)


@pytest.mark.parametrize("model,mp,measured_ms", [
    ("opt-175b", 8, 40.5), ("opt-30b", 2, 23.0), ("opt-30b", 8, 11.0)])
def test_decode_estimate_tracks_fastertransformer(model, mp, measured_ms):
    # What real systems reach (FasterTransformer, batch 1): the estimate is a fitted model,
    # so a looser tolerance than the bounds.
    p = plan_for(model, "a100-80g", mp=mp)
    assert near(decode_step_seconds(p, batch=1, context=1) * 1e3, measured_ms, 0.15)


def test_prefill_bound():
    cfg = PRESETS["opt-175b"]
    assert near(prefill_flops(cfg, 2048) / 1e12, 725)
    assert near(plan_for("opt-175b", "a100-80g", mp=8).prefill_bound_s, 0.29)


def test_logits_workspace():
    w = workspace(PRESETS["opt-175b"], 8, 3072, 2)
    assert near(w.logits / GB, 0.62)
    assert w.mlp == 3072 * 4 * 12288 // 8 * 2


# -- the planner's own rules ----------------------------------------------------------------


def test_kv_cache_tokens_is_the_planners_budget():
    for model, gpu, mp in [("bb3-30b", "a100-40g", 2), ("opt-175b", "a100-80g", 8),
                           ("tiny", "t4", 1)]:
        p = plan_for(model, gpu, mp=mp)
        assert kv_cache_tokens(PRESETS[model], mp, get_gpu(gpu).memory_bytes, 2,
                               3072) == p.kv_budget_tokens
    cfg = PRESETS["opt-13b"]
    small = kv_cache_tokens(cfg, 1, 30 * GIB, 2, 3072)
    assert 0 < small < kv_cache_tokens(cfg, 1, 40 * GIB, 2, 3072)
    assert kv_cache_tokens(cfg, 1, 20 * GIB, 2, 3072) == 0  # weights alone are 23.9 GiB
    # Int8 weights measured by the server: about half the weights, far more cache.
    int8 = weight_bytes_per_gpu(cfg, 1, get_dtype("int8-weights"))
    assert kv_cache_tokens(cfg, 1, 20 * GIB, 2, 3072, weight_bytes=int8) > 5000


def test_dtypes():
    cfg = PRESETS["opt-30b"]
    fp16 = weight_bytes_per_gpu(cfg, 1, FP16)
    assert weight_bytes_per_gpu(cfg, 1, DTYPES["fp32"]) == 2 * fp16
    assert weight_bytes_per_gpu(cfg, 1, DTYPES["bf16"]) == fp16
    assert 0.5 < weight_bytes_per_gpu(cfg, 1, DTYPES["int8"]) / fp16 < 0.53
    p = plan_for("opt-30b", "a100-80g", dtype="int8-weights")
    assert p.mp == 1 and p.request.dtype == "int8" and any("int8" in n for n in p.notes)
    assert plan_for("opt-30b", "a100-80g", dtype="fp32").mp == 2


def test_smallest_degree_search_and_replicas():
    assert plan_for("bb3-30b", "a100-40g").mp == 2  # 55.8 GiB does not fit 40, so two
    p = plan_for("bb3-30b", "a100-40g", concurrency=20)
    assert p.mp == 4 and p.sequences >= 20 and p.replicas == 1
    p = plan_for("bb3-175b", "a100-80g", mp=16, concurrency=200)
    assert p.replicas == 3 and p.gpus == 48 and p.nodes == 6
    assert any("spans 2 nodes" in n for n in p.notes)
    p = plan_for("opt-13b", "a100-80g", mp=2, concurrency=200)
    assert p.gpus == 2 * p.replicas and p.nodes == -(-p.replicas // 4)
    nothing = plan(CapacityRequest(PRESETS["opt-175b"], custom_gpu(4, 300, 50)))
    assert not nothing.fits and nothing.mp == 32 and nothing.smallest_fit is None


def test_shorter_context_holds_more_sequences():
    full = plan_for("opt-66b", "a100-80g", mp=4)
    short = plan_for("opt-66b", "a100-80g", mp=4, context=512)
    assert short.kv_budget_tokens == full.kv_budget_tokens
    assert short.sequences == full.kv_budget_tokens // 512 > 4 * full.sequences - 4


@pytest.mark.parametrize("kw,words", [
    ({"context": 4096}, "2048 learned positions"), ({"mp": 3}, "valid --mp values are 1, 2, 4, 8"),
    ({"utilisation": 1.5}, "utilisation"), ({"concurrency": 0}, "concurrency"),
    ({"dtype": "fp8"}, "int8-weights")])
def test_bad_requests(kw, words):
    with pytest.raises(CapacityError, match=words):
        plan_for("bb3-30b", "a100-80g", **kw)


def test_gpu_catalogue():
    assert {"v100-16g", "v100-32g", "t4", "a10g", "l4", "a100-40g", "a100-80g", "h100-sxm",
            "h100-pcie", "h200"} <= set(CATALOGUE)
    assert get_gpu("A100-80GB") is get_gpu("a100_80g") is CATALOGUE["a100-80g"]
    assert get_gpu("h100-80g") is CATALOGUE["h100-sxm"]
    with pytest.raises(KeyError, match="a100-40g"):
        get_gpu("tpu-v4")


# -- the command line ------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_in_a_real_process():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "opt_serving.capacity.cli", "--model",
                           "bb3-30b", "--gpu", "a100-40g"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model parallel 2 (smallest that fits; valid: 1, 2, 4, 8)" in proc.stdout
    assert "whole model 55.8 GiB" in proc.stdout
    assert "verdict: fits: 4 concurrent 2048-token sequences" in proc.stdout


def test_cli_json(capsys):
    code, out, _ = run_cli(capsys, "--model", "bb3-175b", "--gpu", "a100-80g", "--mp", "16",
                           "--context", "2048", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["mp"] == 16 and data["fits"] and data["request"]["cfg"] == "bb3-175b"
    assert data["valid_mp"] == [1, 2, 4, 8, 16, 32]
    assert near(data["decode_floor_ms"], 10.7)
    assert data["kv_bytes_per_token_per_gpu"] == 4.5 * MIB / 16
    assert data["workspace"]["total"] == sum(data["workspace"][k]
                                             for k in ("logits", "mlp", "hidden"))
    assert [a["mp"] for a in data["alternatives"]] == data["valid_mp"]


def test_cli_does_not_fit_exits_1(capsys):
    code, out, _ = run_cli(capsys, "--model", "opt-175b", "--gpu", "a100-40g", "--mp", "8")
    assert code == 1
    assert "verdict: does not fit: weights need 40.7 GiB per GPU, 40 GiB available" in out
    assert "the smallest degree that fits is 16" in out


def test_cli_custom_gpu(capsys):
    code, out, _ = run_cli(capsys, "--model", "opt-66b", "--gpu-memory-gib", "48",
                           "--gpu-bandwidth-gbs", "864", "--gpu-tflops", "362", "--json")
    assert code == 0 and json.loads(out)["request"]["gpu"]["memory_bytes"] == 48 * GIB
    code, out, _ = run_cli(capsys, "--model", "opt-66b", "--gpu", "h100-sxm",
                           "--gpu-memory-gib", "94", "--json")
    gpu = json.loads(out)["request"]["gpu"]
    assert gpu["memory_bytes"] == 94 * GIB and gpu["bandwidth_bytes_per_s"] == 3350 * GB


def test_cli_plot(tmp_path, capsys):
    out = tmp_path / "plan.png"
    code, _, _ = run_cli(capsys, "--model", "bb3-30b", "--gpu", "a100-40g", "--plot", str(out))
    assert code == 0
    import matplotlib.image
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 1000  # two panels side by side
    assert image[..., :3].std() > 0.1  # something was drawn


def write_tiny_checkpoint(folder, mp: int):
    cfg = PRESETS["tiny"]
    for r in range(mp):
        torch.save({"cfg": {"model": cfg.to_metaseq(mp)},
                    "model": {"decoder.version": torch.tensor([3.0])}},
                   folder / f"reshard-model_part-{r}.pt")


def test_cli_checkpoint_folder(tmp_path, capsys):
    write_tiny_checkpoint(tmp_path, 2)
    code, out, err = run_cli(capsys, "--checkpoint-folder", str(tmp_path), "--gpu", "t4")
    assert code == 0, err
    assert out.startswith("tiny (") and "model parallel 2 (the checkpoint's" in out
    code, out, _ = run_cli(capsys, "--checkpoint", str(tmp_path / "reshard.pt"), "--gpu", "t4",
                           "--mp", "1", "--json")
    assert code == 0 and json.loads(out)["mp"] == 1


@pytest.mark.parametrize("argv,words", [
    (["--model", "opt-7b"], "known presets: opt-125m"),
    (["--model", "bb3-30b", "--gpu", "tpu"], "known GPUs: v100-16g"),
    (["--model", "bb3-30b", "--mp", "3"], "56 heads"),
    (["--model", "bb3-30b", "--mp", "16"], "valid --mp values are 1, 2, 4, 8"),
    (["--model", "bb3-30b", "--context", "4096"], "2048 learned positions"),
    (["--model", "bb3-30b", "--dtype", "int4"], "valid: fp32, fp16, bf16, int8-weights"),
    (["--model", "bb3-30b", "--gpu-memory-gib", "48"], "needs --gpu-memory-gib"),
    (["--model", "bb3-30b", "--utilisation", "0"], "utilisation must be in"),
    (["--checkpoint-folder", "{empty}"], "holds no checkpoint"),
    (["--checkpoint-folder", "{missing}"], "does not exist"),
    (["--model", "bb3-30b", "--plot", "{missing}/x/plot.png"], "cannot write the plot"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, words):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("opt-capacity: ") and words in err
    assert "Traceback" not in err and err.count("\n") == 1  # one paragraph


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--gpu", "t4"])  # neither --model nor --checkpoint-folder
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err
