"""BlenderBot 1 in the other tools (issue 20): ``opt-capacity --model blender-*`` sizes what the
engine really allocates, and ``reshard inspect`` describes ParlAI files and HF folders without
reading their weights (and ``reshard`` says there is nothing to reshard)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt_serving.blenderbot.batch import SharedBeamBatch
from opt_serving.blenderbot.config import PRESETS
from opt_serving.blenderbot.model import BlenderbotModel
from opt_serving.capacity.gpus import get_gpu
from opt_serving.capacity.seq2seq import Seq2SeqRequest, plan_seq2seq

FIXTURES = Path(__file__).parent / "fixtures" / "blenderbot1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_are_the_networks(name):
    with torch.device("meta"):
        model = BlenderbotModel(PRESETS[name])
    assert PRESETS[name].param_count() == sum(p.numel() for p in model.parameters())


def test_a_request_costs_what_the_engine_allocates_for_one_group():
    cfg = PRESETS["blender-tiny"]
    model = BlenderbotModel(cfg)
    one = SharedBeamBatch(model, groups=1, beams=10, steps=40, context=30)  # the default
    allocated = sum(t.numel() * t.element_size()
                    for t in (one.keys, one.values, one.cross_keys, one.cross_values,
                              one.tables, one.cross_mask))
    plan = plan_seq2seq(Seq2SeqRequest(cfg=cfg, gpu=get_gpu("t4"), dtype="fp32", beams=10,
                                       context=30, reply=40, concurrency=1))
    assert plan.request_bytes == allocated
    assert plan.weights_bytes == 4 * sum(p.numel() for p in model.parameters())


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_opt_capacity_plans_blenderbot_on_one_gpu():
    fits = _run("opt_serving.capacity.cli", "--model", "blender-3b", "--gpu", "a10g",
                "--concurrency", "32", "--json")
    assert fits.returncode == 0, fits.stderr
    plan = json.loads(fits.stdout)
    assert plan["weights_bytes"] == PRESETS["blender-3b"].param_count() * 2
    assert plan["max_requests"] >= 32 and plan["replies_per_s"] > 0
    big = _run("opt_serving.capacity.cli", "--model", "blender-9b", "--gpu", "t4")
    assert big.returncode == 1 and "weights alone exceed" in big.stdout
    split = _run("opt_serving.capacity.cli", "--model", "blender-9b", "--mp", "2")
    assert split.returncode == 2 and "one GPU" in split.stderr


def test_reshard_inspect_describes_parlai_files_and_refuses_to_reshard_them(tmp_path):
    done = _run("reshard.cli", "inspect", str(FIXTURES / "tiny-xlm" / "model"), "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report["variant"] == "xlm" and report["config"]["vocab_size"] == 47
    assert report["dtype"] == "float32" and "model.dict.codecs" in report["files"]
    assert report["parameters"] == 39936
    text = _run("reshard.cli", "inspect", str(FIXTURES / "tiny" / "model"))
    assert "BlenderBot 1, ParlAI model file" in text.stdout and "not needed" in text.stdout
    refused = _run("reshard.cli", "--mp", "2", str(FIXTURES / "tiny" / "model"),
                   "--output-dir", str(tmp_path / "out"))
    assert refused.returncode == 2 and "nothing to reshard" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_reshard_inspect_reads_an_hf_folder_header_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    hc = transformers.BlenderbotSmallConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64)
    transformers.BlenderbotSmallForConditionalGeneration(hc).to(torch.float16).save_pretrained(
        tmp_path)
    done = _run("reshard.cli", "inspect", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report["kind"] == "Hugging Face BlenderbotSmallForConditionalGeneration folder"
    assert report["variant"] == "xlm" and report["dtype"] == "float16"


@pytest.mark.parametrize("change, words", [
    ({"d_model": 1 << 30}, "embed_dim must be an integer between 1 and 32768"),
    ({"decoder_layers": -3}, "num_decoder_layers must be an integer"),
    ({"vocab_size": "many"}, "vocab_size must be an integer"),
])
def test_an_hf_config_with_absurd_sizes_is_refused_before_allocating(tmp_path, change, words):
    """A crafted config.json must not make the loader allocate terabytes or loop: it is
    refused by name, and the weights file is never read (there is none here)."""
    from opt_serving.blenderbot.hf import load_folder
    from opt_serving.checkpoint.errors import CheckpointError

    config = {"architectures": ["BlenderbotForConditionalGeneration"], "model_type": "blenderbot",
              "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4,
              "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 96,
              "max_position_embeddings": 64, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_folder(tmp_path)
    assert words in str(err.value)
