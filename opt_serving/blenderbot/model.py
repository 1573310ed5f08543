"""BlenderBot 1's encoder-decoder (ParlAI's ``transformer/generator``), parameters named exactly
as in ParlAI's model files, so that loading one is a strict ``load_state_dict``.

Two variants (``BlenderbotConfig.variant``):
- ``prelayernorm`` (400M / 1B distills, 2.7B, 9.4B): ``x + sublayer(norm(x))`` layers and a
  final ``norm_embeddings`` in the encoder and the decoder.
- ``xlm`` (90M): ``norm(x + sublayer(x))`` layers, no final norm; the encoder normalises after
  adding positions, the decoder before.

One embedding matrix serves the encoder, the decoder and the output projection (tied, no bias);
token embeddings are scaled by sqrt(d); ParlAI sets the ``__start__`` logit to its ``neginf``
(-1e20, not -inf). Attention
is q / sqrt(d_head) . k with a softmax in fp32, the activation exact gelu, layer-norm eps 1e-5.
This is the full-recompute reference; the engine's cached decoding is built on it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import START_ID, BlenderbotConfig, neginf

EPS = 1e-5


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_lin, self.k_lin, self.v_lin = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) attends to memory (B, S, D) where ``mask`` (B, T, S) is true."""
        b, t, d = x.shape
        hd = d // self.heads

        def split(y):  # (B, L, D) -> (B, H, L, hd)
            return y.view(b, -1, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q_lin(x)), split(self.k_lin(memory)), split(self.v_lin(memory))
        scores = (q / math.sqrt(hd)) @ k.transpose(-1, -2)  # (B, H, T, S)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        y = (weights @ v).transpose(1, 2).reshape(b, t, d)
        return self.out_lin(y)


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BlenderbotConfig):
        super().__init__()
        d = cfg.embed_dim
        self.attention = MultiHeadAttention(d, cfg.num_heads)
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=EPS), nn.LayerNorm(d, eps=EPS)
        self.ffn = FeedForward(d, cfg.ffn_dim)
        self.pre = cfg.variant == "prelayernorm"

    def forward(self, x, mask):
        if self.pre:
            h = self.norm1(x)
            x = x + self.attention(h, h, mask)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attention(x, x, mask))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BlenderbotConfig):
        super().__init__()
        d = cfg.embed_dim
        self.self_attention = MultiHeadAttention(d, cfg.num_heads)
        self.encoder_attention = MultiHeadAttention(d, cfg.num_heads)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=EPS) for _ in range(3))
        self.ffn = FeedForward(d, cfg.ffn_dim)
        self.pre = cfg.variant == "prelayernorm"

    def forward(self, x, causal, memory, memory_mask):
        if self.pre:
            h = self.norm1(x)
            x = x + self.self_attention(h, h, causal)
            x = x + self.encoder_attention(self.norm2(x), memory, memory_mask)
            return x + self.ffn(self.norm3(x))
        x = self.norm1(x + self.self_attention(x, x, causal))
        x = self.norm2(x + self.encoder_attention(x, memory, memory_mask))
        return self.norm3(x + self.ffn(x))


class Encoder(nn.Module):
    def __init__(self, cfg: BlenderbotConfig, embeddings: nn.Embedding):
        super().__init__()
        self.cfg, self.embeddings = cfg, embeddings
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.embed_dim)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.norm_embeddings = nn.LayerNorm(cfg.embed_dim, eps=EPS)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask (B, S) -> (B, S, D). Positions count real tokens only (ParlAI's
        ``cumsum(mask) - 1``), so padding never shifts them."""
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        x = self.embeddings(tokens) * self.cfg.embed_scale + self.position_embeddings(positions)
        if self.cfg.variant == "xlm":
            x = self.norm_embeddings(x)
        x = x * mask[..., None]
        attend = mask[:, None, :].expand(-1, tokens.shape[1], -1)  # (B, S, S)
        for layer in self.layers:
            x = layer(x, attend) * mask[..., None]
        if self.cfg.variant == "prelayernorm":
            x = self.norm_embeddings(x)
        return x * mask[..., None]


class Decoder(nn.Module):
    def __init__(self, cfg: BlenderbotConfig, embeddings: nn.Embedding):
        super().__init__()
        self.cfg, self.embeddings = cfg, embeddings
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.norm_embeddings = nn.LayerNorm(cfg.embed_dim, eps=EPS)

    def forward(self, tokens, memory, memory_mask) -> torch.Tensor:
        """tokens (B, T) from ``__start__``; memory (B, S, D), memory_mask (B, S) ->
        hidden states (B, T, D)."""
        b, t = tokens.shape
        x = self.embeddings(tokens) * self.cfg.embed_scale
        if self.cfg.variant == "xlm":
            x = self.norm_embeddings(x)
        x = x + self.position_embeddings(torch.arange(t, device=tokens.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        causal = causal[None].expand(b, -1, -1)
        cross = memory_mask[:, None, :].expand(-1, t, -1)
        for layer in self.layers:
            x = layer(x, causal, memory, cross)
        if self.cfg.variant == "prelayernorm":
            x = self.norm_embeddings(x)
        return x


class BlenderbotModel(nn.Module):
    """``encode(tokens, mask)`` -> memory; ``decode(tokens, memory, mask)`` -> logits (B, T, V)
    with ``__start__`` blocked, as ParlAI's ``output``."""

    def __init__(self, cfg: BlenderbotConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.encoder = Encoder(cfg, self.embeddings)
        self.decoder = Decoder(cfg, self.embeddings)
        # ParlAI keeps the start id as a buffer; its files carry it, so the load stays strict.
        self.register_buffer("START", torch.tensor([START_ID]))

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(tokens, tokens != 0 if mask is None else mask)

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor,
               memory_mask: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.decoder(tokens, memory, memory_mask), self.embeddings.weight)
        logits[..., START_ID] = neginf(logits.dtype)
        return logits


def full_recompute(model: BlenderbotModel, context: Sequence[int]):
    """``search``'s step function on the reference network: the context encoded once, each
    call's decoder prefixes (n lists from ``__start__``) run whole -> next-token logits
    (n, V). What the cached engine is tested against."""
    ctx = torch.tensor([list(context)], device=model.embeddings.weight.device)
    with torch.no_grad():
        memory = model.encode(ctx)

    @torch.no_grad()
    def step(prefixes: list[list[int]]) -> torch.Tensor:
        n = len(prefixes)
        return model.decode(torch.tensor(prefixes, device=ctx.device),
                            memory.expand(n, -1, -1), (ctx != 0).expand(n, -1))[:, -1]
    return step


def init_random(model: BlenderbotModel, seed: int = 0, std: float = 0.05) -> BlenderbotModel:
    """Deterministic random weights, biases and norms included (tests and benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    + std * torch.randn(p.shape, generator=gen))
    return model
