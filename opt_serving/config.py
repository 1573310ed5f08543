"""The OPT model configuration: one frozen dataclass and the named presets.

Everything that needs a model's shape (the model, the resharder's validation, the capacity
planner, the server) reads it from here, so there is one source of truth.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from opt_serving.split_rules import is_buffer

from opt_serving.vocab import (BOS_ID, DICT_SIZE, EOS_ID, MAX_POSITIONS,  # noqa: F401
                               PAD_ID, POSITION_OFFSET, VOCAB_SIZE)

# The dtypes the command-line tools accept, by the names they use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_LIMITS = {"num_layers": 1024, "embed_dim": 1 << 17, "num_heads": 4096, "ffn_dim": 1 << 19,
           "vocab_size": 1 << 20, "dict_size": 1 << 20, "max_positions": 1 << 20}


def _cfg_int(get, key: str, top: int) -> int | None:
    """A size in metaseq's cfg: 12 and 12.0 are fine; 12.5, "12", True, 0 and sizes past
    ``top`` are not. None when absent."""
    v = get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
        raise ValueError(f"cfg['model'].{key} must be an integer between 1 and {top}, got {v!r}")
    return v


@dataclass(frozen=True)
class OPTConfig:
    """Shapes of a pre-LN OPT decoder (OPT-1.3B and up, BB3, and the tiny test sizes)."""

    name: str
    num_layers: int
    embed_dim: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = VOCAB_SIZE
    dict_size: int = DICT_SIZE
    max_positions: int = MAX_POSITIONS
    scale_embedding: bool = False  # metaseq's no_scale_embedding=True for every OPT release

    def __post_init__(self):
        # A checkpoint's cfg is input: sizes past these would only allocate or loop for ever
        # (OPT-175B: 96 layers, 12288 wide, 96 heads, 2048 positions).
        for name, top in _LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
                raise ValueError(f"{name} must be an integer between 1 and {top}, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} is not a multiple of "
                             f"num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def position_rows(self) -> int:
        return self.max_positions + POSITION_OFFSET

    def valid_mp_degrees(self, limit: int = 256) -> list[int]:
        """Degrees M that split heads, the vocabulary and the FFN evenly."""
        return [m for m in range(1, limit + 1)
                if self.num_heads % m == 0 and self.vocab_size % m == 0 and self.ffn_dim % m == 0]

    def check_mp(self, mp: int) -> None:
        if mp not in self.valid_mp_degrees():
            valid = ", ".join(str(m) for m in self.valid_mp_degrees())
            raise ValueError(f"{self.name} has {self.num_heads} heads and a vocabulary of "
                             f"{self.vocab_size}: --mp {mp} does not divide them; valid --mp "
                             f"values are {valid}")

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the unsharded (M = 1) fused checkpoint, by metaseq name."""
        d, f = self.embed_dim, self.ffn_dim
        shapes: dict[str, tuple[int, ...]] = {
            "decoder.version": (1,),
            "decoder.embed_tokens.weight": (self.vocab_size, d),
            "decoder.embed_positions.weight": (self.position_rows, d),
        }
        for i in range(self.num_layers):
            p = f"decoder.layers.{i}."
            shapes.update({
                p + "self_attn.qkv_proj.weight": (3 * d, d),
                p + "self_attn.qkv_proj.bias": (3 * d,),
                p + "self_attn.out_proj.weight": (d, d),
                p + "self_attn.out_proj.bias": (d,),
                p + "self_attn_layer_norm.weight": (d,),
                p + "self_attn_layer_norm.bias": (d,),
                p + "fc1.weight": (f, d),
                p + "fc1.bias": (f,),
                p + "fc2.weight": (d, f),
                p + "fc2.bias": (d,),
                p + "final_layer_norm.weight": (d,),
                p + "final_layer_norm.bias": (d,),
            })
        shapes["decoder.layer_norm.weight"] = (d,)
        shapes["decoder.layer_norm.bias"] = (d,)
        return shapes

    def param_count(self) -> int:
        """Parameters (not buffers: decoder.version)."""
        total = 0
        for name, shape in self.param_shapes().items():
            if is_buffer(name):
                continue
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V for every layer, all heads (divide by the MP degree for one GPU)."""
        return 2 * self.num_layers * self.embed_dim * bytes_per_element

    # -- metaseq cfg ---------------------------------------------------------------------------

    @classmethod
    def from_metaseq(cls, model_cfg, name: str | None = None) -> "OPTConfig":
        """Build from metaseq's ``cfg["model"]`` (an argparse.Namespace or a dict)."""
        get = (model_cfg.get if isinstance(model_cfg, dict)
               else lambda k, default=None: getattr(model_cfg, k, default))
        missing = [k for k in ("decoder_layers", "decoder_embed_dim", "decoder_attention_heads")
                   if get(k) is None]
        if missing:
            raise KeyError(f"cfg['model'] lacks {', '.join(missing)}")
        d = _cfg_int(get, "decoder_embed_dim", _LIMITS["embed_dim"])
        layers = _cfg_int(get, "decoder_layers", _LIMITS["num_layers"])
        heads = _cfg_int(get, "decoder_attention_heads", _LIMITS["num_heads"])
        ffn = _cfg_int(get, "decoder_ffn_embed_dim", _LIMITS["ffn_dim"]) or 4 * d
        positions = (_cfg_int(get, "max_target_positions", _LIMITS["max_positions"])
                     or _cfg_int(get, "tokens_per_sample", _LIMITS["max_positions"])
                     or MAX_POSITIONS)
        scale = not bool(get("no_scale_embedding", True))
        probe = cls(name="?", num_layers=layers, embed_dim=d, num_heads=heads, ffn_dim=ffn,
                    max_positions=positions, scale_embedding=scale)
        preset = closest_preset(probe)
        default = preset.name if same_shape(preset, probe) else f"opt-custom-{layers}x{d}"
        return dataclasses.replace(probe, name=name or default)

    def to_metaseq(self, mp: int = 1) -> argparse.Namespace:
        """The cfg["model"] Namespace metaseq writes for this shape at degree ``mp``."""
        return argparse.Namespace(
            _name="transformer_lm_megatron", arch="transformer_lm_megatron",
            decoder_layers=self.num_layers, decoder_embed_dim=self.embed_dim,
            decoder_ffn_embed_dim=self.ffn_dim, decoder_attention_heads=self.num_heads,
            decoder_input_dim=self.embed_dim, decoder_output_dim=self.embed_dim,
            activation_fn="relu", share_decoder_input_output_embed=True,
            decoder_learned_pos=True, no_scale_embedding=not self.scale_embedding,
            decoder_normalize_before=True, max_target_positions=self.max_positions,
            tokens_per_sample=self.max_positions, model_parallel_size=mp,
            use_sharded_state=True, criterion="vocab_parallel_cross_entropy",
            self_attn_doc_sep=-1, dropout=0.1, attention_dropout=0.1,
            memory_efficient_fp16=True, fp16=True, bf16=False,
        )


def same_shape(a: OPTConfig, b: OPTConfig) -> bool:
    fields = ("num_layers", "embed_dim", "num_heads", "ffn_dim", "vocab_size", "max_positions")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _preset(name, layers, dim, heads, **kw) -> OPTConfig:
    return OPTConfig(name=name, num_layers=layers, embed_dim=dim, num_heads=heads,
                     ffn_dim=kw.pop("ffn_dim", 4 * dim), **kw)


# OPT-350M (post-LN with a 512-d projection) is not supported by this decoder.
PRESETS: dict[str, OPTConfig] = {c.name: c for c in (
    _preset("opt-125m", 12, 768, 12),
    _preset("opt-1.3b", 24, 2048, 32),
    _preset("opt-2.7b", 32, 2560, 32),
    _preset("opt-6.7b", 32, 4096, 32),
    _preset("opt-13b", 40, 5120, 40),
    _preset("opt-30b", 48, 7168, 56),
    _preset("opt-66b", 64, 9216, 72),
    _preset("opt-175b", 96, 12288, 96),
    # BlenderBot-3 models are fine-tuned OPT-30B / OPT-175B: same shapes.
    _preset("bb3-30b", 48, 7168, 56),
    _preset("bb3-175b", 96, 12288, 96),
    # Test sizes: the real vocabulary (so the real tokenizer works) and few, thin layers.
    _preset("tiny", 2, 64, 4),
    _preset("tiny-8h", 2, 64, 8),
    _preset("tiny-4l", 4, 128, 8),
)}


def get_preset(name: str) -> OPTConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: "
                       f"{', '.join(PRESETS)}") from None


def closest_preset(cfg: OPTConfig) -> OPTConfig:
    """The preset with the same shape (OPT before BB3), else the nearest in parameter count."""
    for preset in PRESETS.values():
        if same_shape(preset, cfg):
            return preset
    return min(PRESETS.values(), key=lambda p: abs(p.param_count() - cfg.param_count()))
