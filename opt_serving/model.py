"""The OPT decoder, with parameters named exactly as in metaseq checkpoints.

Loading a checkpoint is therefore a strict ``load_state_dict``: a missing or unexpected key is
a loud error. The model knows nothing about ranks; ``tensor_parallel.apply`` shards a built
model afterwards and installs the collectives through the ``comm`` hooks below.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import POSITION_OFFSET, OPTConfig

# cuDNN's attention builds an execution plan for every new (batch, key length) shape: with a
# KV cache the key length grows every step, and fp16 decoding on an H100 ran at 15 tokens/s
# instead of 165 (measured, torch 2.11). The memory-efficient kernel takes masks and no plans.
_CUDA_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


class Comm:
    """Collectives of one tensor-parallel group; the identity when there is a single rank."""

    size = 1
    rank = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x


SINGLE = Comm()


class KVCache:
    """Preallocated keys and values, one row ("slot") per sequence.

    k[layer], v[layer]: (slots, local_heads, max_len, head_dim). Each slot is filled from
    position 0; a caller tracks how many tokens of each slot are valid (``start``).
    """

    def __init__(self, cfg: OPTConfig, num_slots: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tp_size: int = 1):
        heads = cfg.num_heads // tp_size
        shape = (num_slots, heads, max_len, cfg.head_dim)
        self.max_len = max_len
        self.num_slots = num_slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]


class SelfAttention(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        d = cfg.embed_dim
        # Fused projection, rows in metaseq's K, V, Q order (per rank when sharded).
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.num_heads = cfg.num_heads  # local heads: tensor_parallel.apply divides it
        self.head_dim = cfg.head_dim
        self.comm: Comm = SINGLE

    def forward(self, x, layer: int, mask, cache: KVCache | None, slots, write_idx):
        b, t, _ = x.shape  # (B, T, D)
        k, v, q = self.qkv_proj(x).chunk(3, dim=-1)  # each (B, T, H_local * hd)
        k, v, q = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (k, v, q))
        if cache is not None:
            # write_idx: (B, T) absolute cache positions of the new tokens.
            ck, cv = cache.k[layer], cache.v[layer]
            rows = slots[:, None].expand(b, t)
            ck[rows, :, write_idx] = k.transpose(1, 2).to(ck.dtype)
            cv[rows, :, write_idx] = v.transpose(1, 2).to(cv.dtype)
            klen = mask.shape[-1]
            k, v = ck[slots, :, :klen], cv[slots, :, :klen]  # (B, H, S, hd)
        # mask: (B, 1, T, S) bool, True = may attend. Softmax runs in fp32 inside SDPA kernels.
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return row_parallel(self.out_proj, y, self.comm)


def row_parallel(linear: nn.Linear, x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """x @ W.T, summed over ranks, and the (replicated) bias added once after the sum."""
    y = comm.all_reduce(F.linear(x, linear.weight))
    return y + linear.bias if linear.bias is not None else y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x, layer, mask, cache, slots, write_idx):
        x = x + self.self_attn(self.self_attn_layer_norm(x), layer, mask, cache, slots, write_idx)
        h = F.relu(self.fc1(self.final_layer_norm(x)))
        return x + row_parallel(self.fc2, h, self.self_attn.comm)


class Decoder(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_positions = nn.Embedding(cfg.position_rows, cfg.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        # fairseq's state-dict version marker; metaseq's strict load expects it.
        self.register_buffer("version", torch.tensor([3.0]))
        # First vocabulary row held by this rank (vocab-parallel embedding when sharded).
        self.vocab_start = 0
        self.comm: Comm = SINGLE


class OPTModel(nn.Module):
    """``logits = model(tokens, start=..., cache=..., slots=...)``: (B, T) ids -> (B, T, V)."""


    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        rows = dec.embed_tokens.weight.shape[0]
        if dec.comm.size == 1:
            return dec.embed_tokens(tokens)
        # Vocab-parallel lookup: each rank embeds the ids in its row range, zeros elsewhere.
        local = tokens - dec.vocab_start
        outside = (local < 0) | (local >= rows)
        x = dec.embed_tokens(local.masked_fill(outside, 0))
        return dec.comm.all_reduce(x.masked_fill(outside[..., None], 0.0))

    def forward(self, tokens: torch.Tensor, *, start: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T); start (B,) tokens already cached per row; slots (B,) cache rows;
        select (B, K) time indices whose logits are wanted (default: all T)."""
        b, t = tokens.shape
        dev = tokens.device
        if start is None:
            start = torch.zeros(b, dtype=torch.long, device=dev)
        qpos = start[:, None] + torch.arange(t, device=dev)[None, :]  # (B, T) absolute positions
        if cache is None:
            if bool((start != 0).any()):
                raise ValueError("a non-zero start needs a KV cache")
            kpos = torch.arange(t, device=dev)
        else:
            if slots is None:
                raise ValueError("a KV cache needs slots")
            klen = int(qpos.max()) + 1
            if klen > cache.max_len:
                raise ValueError(f"sequence of {klen} tokens exceeds the cache's {cache.max_len}")
            kpos = torch.arange(klen, device=dev)
        mask = (kpos[None, None, :] <= qpos[:, :, None])[:, None]  # (B, 1, T, S)

        dec = self.decoder
        x = self.embed(tokens)
        if self.cfg.scale_embedding:
            x = x * self.cfg.embed_dim ** 0.5
        pos = (qpos + POSITION_OFFSET).clamp(max=dec.embed_positions.weight.shape[0] - 1)
        x = x + dec.embed_positions(pos)
        backends = sdpa_kernel(list(_CUDA_ATTENTION)) if x.is_cuda else contextlib.nullcontext()
        with backends:
            for i, layer in enumerate(dec.layers):
                x = layer(x, i, mask, cache, slots, qpos)
        if select is not None:  # project only the positions we sample from: (B, K, D)
            x = x.gather(1, select[:, :, None].expand(-1, -1, x.shape[-1]))
        x = dec.layer_norm(x)
        # Tied output head: (B, T, D) @ (V_local, D).T, gathered so every rank sees all of V.
        logits = dec.comm.all_gather_last(F.linear(x, dec.embed_tokens.weight))
        # Dictionary padding symbols ("madeupword", ids >= dict_size) are never produced.
        logits[..., self.cfg.dict_size:] = float("-inf")
        return logits


def init_random(model: OPTModel, seed: int = 0, std: float = 0.02) -> OPTModel:
    """Deterministic random weights with non-zero biases (so bias handling is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model
