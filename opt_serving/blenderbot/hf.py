"""Hugging Face's Blenderbot weights in ParlAI's names: a config and a state dict our model
loads strictly, and a folder ``save_pretrained`` wrote. HF's ``BlenderbotForConditionalGeneration`` is the prelayernorm network (the
400M / 1B distills, 2.7B); ``BlenderbotSmall`` is the 90M's xlm network."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from opt_serving.checkpoint import torch_file
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.lazy_tensor import LazyTensor

from .config import START_ID, BlenderbotConfig
from .model import BlenderbotModel

# HF name (after "model.") -> ParlAI name, per layer part.
_LAYER = (("self_attn.q_proj", "{att}.q_lin"), ("self_attn.k_proj", "{att}.k_lin"),
          ("self_attn.v_proj", "{att}.v_lin"), ("self_attn.out_proj", "{att}.out_lin"),
          ("encoder_attn.q_proj", "encoder_attention.q_lin"),
          ("encoder_attn.k_proj", "encoder_attention.k_lin"),
          ("encoder_attn.v_proj", "encoder_attention.v_lin"),
          ("encoder_attn.out_proj", "encoder_attention.out_lin"),
          ("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm2"),
          ("fc1", "ffn.lin1"), ("fc2", "ffn.lin2"))
_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def config_from_hf(hf: Mapping, name: str = "hf") -> BlenderbotConfig:
    """From an HF ``config.json`` (as a dict)."""
    small = hf.get("model_type") == "blenderbot-small"
    if hf.get("encoder_attention_heads") != hf.get("decoder_attention_heads") or \
            hf.get("encoder_ffn_dim") != hf.get("decoder_ffn_dim"):
        raise ValueError("config.json: encoder and decoder differ in heads or ffn width; "
                         "ParlAI's BlenderBot has one of each")
    return BlenderbotConfig(
        name=name, variant="xlm" if small else "prelayernorm", embed_dim=hf["d_model"],
        num_encoder_layers=hf["encoder_layers"], num_decoder_layers=hf["decoder_layers"],
        num_heads=hf["encoder_attention_heads"], ffn_dim=hf["encoder_ffn_dim"],
        vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
        embeddings_scale=bool(hf.get("scale_embedding", False)))


def parlai_name(hf_name: str, cfg: BlenderbotConfig) -> str | None:
    """ParlAI's name of an HF parameter; None for what ParlAI does not have (the tied head,
    the duplicate embedding rows, a zero ``final_logits_bias``)."""
    name = hf_name.removeprefix("model.")
    if name == "shared.weight":
        return "embeddings.weight"
    if name in ("lm_head.weight", "final_logits_bias") or name.endswith("embed_tokens.weight"):
        return None
    side, _, rest = name.partition(".")
    if rest == "embed_positions.weight":
        return f"{side}.position_embeddings.weight"
    if rest in ("layer_norm.weight", "layer_norm.bias", "layernorm_embedding.weight",
                "layernorm_embedding.bias"):
        return f"{side}.norm_embeddings.{rest.rpartition('.')[2]}"
    m = _LAYER_RE.match(name)
    if m is None:
        raise KeyError(f"unexpected parameter {hf_name!r} in a Blenderbot checkpoint")
    side, layer, part, kind = m.groups()
    att = "attention" if side == "encoder" else "self_attention"
    if part == "final_layer_norm":
        mapped = "norm2" if side == "encoder" else "norm3"
    else:
        mapped = dict(_LAYER).get(part)
        if mapped is None:
            raise KeyError(f"unexpected parameter {hf_name!r} in a Blenderbot checkpoint")
    return f"{side}.layers.{layer}.{mapped.format(att=att)}.{kind}"


def state_from_hf(state: Mapping[str, torch.Tensor], cfg: BlenderbotConfig) -> dict:
    """HF's state dict in ParlAI's names (the shared embedding under all three of ParlAI's
    keys). A non-zero ``final_logits_bias`` is refused: ParlAI's output has no bias."""
    bias = state.get("final_logits_bias")
    if bias is not None and bool(bias.ne(0).any()):
        raise ValueError("final_logits_bias is not zero: ParlAI's BlenderBot has no output "
                         "bias, so these weights would not give ParlAI's logits")
    out = {}
    for name, tensor in state.items():
        mapped = parlai_name(name, cfg)
        if mapped is not None:
            out[mapped] = tensor
    shared = out["embeddings.weight"]
    out["encoder.embeddings.weight"] = out["decoder.embeddings.weight"] = shared
    out["START"] = torch.tensor([START_ID])
    return out


MAX_CONFIG_BYTES = 1 << 20
ARCHITECTURES = ("BlenderbotForConditionalGeneration", "BlenderbotSmallForConditionalGeneration")


def load_folder(folder: str | Path) -> BlenderbotModel:
    """A Hugging Face Blenderbot folder: ``config.json`` and ``model.safetensors`` (preferred)
    or ``pytorch_model.bin`` (read by the allow-list unpickler: nothing in it runs)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file() or config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(str(config_path), "is missing or too large to be a config",
                              "pass the folder that save_pretrained wrote")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(str(config_path), f"is not JSON ({e})", "copy it again") from None
    if not isinstance(hf, dict) or not set(hf.get("architectures") or ()) & set(ARCHITECTURES):
        raise CheckpointError(str(config_path), "is not a Blenderbot config (architectures: "
                              f"{hf.get('architectures') if isinstance(hf, dict) else None})",
                              f"this loader reads {' or '.join(ARCHITECTURES)}")
    try:
        cfg = config_from_hf(hf, folder.name or "blenderbot")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(str(config_path), f"does not describe a BlenderBot this toolkit "
                              f"runs: {e}", "check the file") from None
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch_file.load(folder / "pytorch_model.bin")
        state = {k: v.read() if isinstance(v, LazyTensor) else v for k, v in state.items()}
    else:
        raise CheckpointError(str(folder), "holds neither model.safetensors nor "
                              "pytorch_model.bin", "pass the folder that save_pretrained wrote")
    shared = state.get("model.shared.weight")
    if shared is None or tuple(shared.shape) != (cfg.vocab_size, cfg.embed_dim):
        raise CheckpointError(str(folder), "has no model.shared.weight of the config's shape "
                              f"({cfg.vocab_size}, {cfg.embed_dim})", "the weights and "
                              "config.json belong to different models")
    model = BlenderbotModel(cfg)
    model.load_state_dict(state_from_hf(state, cfg))
    return model.eval()


def to_hf(model: BlenderbotModel):
    """The same weights as an HF ``BlenderbotForConditionalGeneration`` (prelayernorm) or
    ``BlenderbotSmallForConditionalGeneration`` (xlm), for tests and benchmarks against HF.
    Needs ``transformers``."""
    import transformers

    cfg = model.cfg
    kind = "BlenderbotSmall" if cfg.variant == "xlm" else "Blenderbot"
    hc = getattr(transformers, f"{kind}Config")(
        vocab_size=cfg.vocab_size, d_model=cfg.embed_dim, encoder_layers=cfg.num_encoder_layers,
        decoder_layers=cfg.num_decoder_layers, encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim, max_position_embeddings=cfg.max_positions,
        scale_embedding=cfg.embeddings_scale, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=START_ID, forced_eos_token_id=None)
    hf = getattr(transformers, f"{kind}ForConditionalGeneration")(hc)
    ours = model.state_dict()
    state = {}
    for name, tensor in hf.state_dict().items():
        mapped = parlai_name(name, cfg)
        state[name] = (ours[mapped] if mapped else torch.zeros_like(tensor)
                       if name == "final_logits_bias" else ours["embeddings.weight"])
    hf.load_state_dict(state)
    return hf.to(next(model.parameters()).dtype).eval()
