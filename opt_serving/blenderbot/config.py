"""BlenderBot 1's shapes: one frozen dataclass and the named presets (ParlAI's zoo models and
tiny test sizes), as ``opt_serving.config`` is for OPT."""

from __future__ import annotations

import math
from dataclasses import dataclass

NULL_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3  # ParlAI's __null__ __start__ __end__ __unk__
NEAR_INF, NEAR_INF_FP16 = 1e20, 65504.0  # ParlAI's neginf(): what "blocked" means in a score


def neginf(dtype) -> float:
    import torch

    return -NEAR_INF_FP16 if dtype == torch.float16 else -NEAR_INF


# A model file's options are input: past these (9.4B: 4096 wide, 32 layers) they would only
# allocate or loop for ever.
_LIMITS = {"embed_dim": 1 << 15, "num_encoder_layers": 256, "num_decoder_layers": 256,
           "num_heads": 1024, "ffn_dim": 1 << 17, "vocab_size": 1 << 20,
           "max_positions": 1 << 16}


@dataclass(frozen=True)
class BlenderbotConfig:
    name: str
    variant: str  # "prelayernorm" (400M .. 9.4B) or "xlm" (90M)
    embed_dim: int
    num_encoder_layers: int
    num_decoder_layers: int
    num_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    embeddings_scale: bool = True  # ParlAI's default: token embeddings x sqrt(d)

    def __post_init__(self):
        if self.variant not in ("prelayernorm", "xlm"):
            raise ValueError(f"variant must be prelayernorm or xlm, got {self.variant!r}")
        for name, top in _LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
                raise ValueError(f"{name} must be an integer between 1 and {top}, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads "
                             f"{self.num_heads}")

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embed_dim) if self.embeddings_scale else 1.0

    def _layers(self) -> tuple[int, int]:
        """Parameters of one (encoder, decoder) layer."""
        d, f = self.embed_dim, self.ffn_dim
        attention, ffn, norm = 4 * (d * d + d), d * f + f + f * d + d, 2 * d
        return attention + ffn + 2 * norm, 2 * attention + ffn + 3 * norm

    def param_count(self) -> int:
        """Parameters of ``model.BlenderbotModel`` (one shared embedding), by arithmetic."""
        encoder, decoder = self._layers()
        d = self.embed_dim
        embeddings = self.vocab_size * d + 2 * self.max_positions * d + 4 * d  # + 2 norms
        return embeddings + self.num_encoder_layers * encoder + self.num_decoder_layers * decoder

    def step_params(self) -> int:
        """What one decoding step reads of them: the decoder layers and the (tied) output
        embedding; the encoder runs once per request."""
        return self.num_decoder_layers * self._layers()[1] + self.vocab_size * self.embed_dim

    def kv_bytes(self, beams: int, steps: int, context: int, itemsize: int) -> int:
        """The decoder cache of one request: keys and values of ``beams`` x ``steps`` reply
        positions, and of the ``context`` encoder positions once (cross-attention)."""
        return 2 * self.num_decoder_layers * self.embed_dim * itemsize * \
            (beams * steps + context)


PRESETS = {c.name: c for c in (
    BlenderbotConfig("blender-90m", "xlm", 512, 8, 8, 16, 2048, 54944, 512),
    BlenderbotConfig("blender-400m-distill", "prelayernorm", 1280, 2, 12, 32, 5120, 8008, 128),
    BlenderbotConfig("blender-1b-distill", "prelayernorm", 2560, 2, 12, 32, 10240, 8008, 128),
    BlenderbotConfig("blender-3b", "prelayernorm", 2560, 2, 24, 32, 10240, 8008, 128),
    BlenderbotConfig("blender-9b", "prelayernorm", 4096, 4, 32, 32, 16384, 8008, 128),
    BlenderbotConfig("blender-tiny", "prelayernorm", 32, 2, 2, 4, 64, 96, 64),
    BlenderbotConfig("blender-tiny-xlm", "xlm", 32, 2, 2, 4, 64, 96, 64),
)}
