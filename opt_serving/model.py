"""The OPT decoder, with parameters named exactly as in metaseq checkpoints.

Loading a checkpoint is therefore a strict ``load_state_dict``: a missing or unexpected key is
a loud error. The model knows nothing about ranks; ``tensor_parallel.apply`` shards a built
model afterwards and installs the collectives through the ``comm`` hooks below.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .config import POSITION_OFFSET, OPTConfig
from .kernels import linear_relu, project

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
    """Paged keys and values for ``num_blocks`` blocks of ``block_size`` positions.

    k[layer], v[layer]: (local_heads, num_blocks * block_size, head_dim). Position p of a
    sequence whose block table is t lives in row t[p // block_size] * block_size +
    p % block_size (``decoding.blocks`` hands out the tables). Heads first, so that the keys
    of a sequence whose blocks are consecutive are one slice that attention reads in place.
    """

    def __init__(self, cfg: OPTConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tp_size: int = 1):
        shape = (cfg.num_heads // tp_size, num_blocks * block_size, cfg.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]


@dataclass(frozen=True)
class AttentionRows:
    """Where each sequence of a packed step reads and writes, worked out once per step for all
    layers. ``write`` (N,): the cache row of each packed token.

    The first ``decode`` packed rows are one-token decode rows attended in one batched call
    (``attention.paged_decode``, GPU only): their block tables ``tables`` (decode, M) and key
    counts ``lens`` (decode,) are device tensors. The other sequences are attended one by one
    (the CPU path for every row): sequence i's queries are packed rows spans[i]; its keys are
    cache rows keys[i] (a slice when its blocks are consecutive: read in place, else an index
    tensor: gathered, its own length only); masks[i]: None for one query, "causal" for a chunk
    from position 0, else a (T_i, S_i) bool mask or, on a GPU, a lower-right causal bias."""

    spans: tuple[tuple[int, int], ...]
    keys: tuple  # slice | LongTensor (S_i,) per sequence
    masks: tuple  # None | "causal" | BoolTensor (T_i, S_i) | CausalBias per sequence
    write: torch.Tensor  # (N,) cache rows of the packed tokens
    decode: int = 0
    tables: torch.Tensor | None = None  # (decode, M) block tables
    lens: torch.Tensor | None = None  # (decode,) keys per decode row (its position + 1)
    block_size: int = 0

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], tables: list[list[int]],
              block_size: int, device) -> "AttentionRows":
        """The CPU path: every sequence attended on its own."""
        spans, keys, masks, write = [], [], [], []
        offset = 0
        for start, n, table in zip(starts, lengths, tables):
            key_rows, rows = _sequence_rows(start + n, table, block_size, device)
            spans.append((offset, offset + n))
            offset += n
            keys.append(key_rows)
            write.append(rows[start:])
            # One query sees every key: no mask. A chunk from position 0 is plain causal
            # ("causal", the kernel's own, 2x faster than an explicit mask on a CPU).
            end = start + n
            masks.append(None if n == 1 else "causal" if start == 0 else (
                torch.arange(end, device=device)[None, :]
                <= torch.arange(start, end, device=device)[:, None]))
        return cls(tuple(spans), tuple(keys), tuple(masks), torch.cat(write).to(device))

    @classmethod
    def build_batched(cls, starts: torch.Tensor, lengths: torch.Tensor, tables: torch.Tensor,
                      block_size: int, device,
                      packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> "AttentionRows":
        """The GPU path, from a step's CPU tensors (B,), (B,), (B, M): the leading one-token
        rows go to the batched decode call, the write rows of every token are computed at
        once, and only prompt chunks are looped over (with a lower-right causal bias, which
        SDPA's flash kernel takes, when they continue a sequence). ``packed``: the step's
        ``packed_positions`` when the caller has them already."""
        b = lengths.shape[0]
        lead = int((lengths == 1).long().cumprod(0).sum()) if b else 0  # leading 1-token rows
        n = int(lengths.sum())
        seq, pos = packed if packed is not None else packed_positions(starts, lengths)
        first = torch.cumsum(lengths, 0) - lengths  # (B,) each sequence's first packed row
        write = tables[seq, pos // block_size].clamp(min=0) * block_size + pos % block_size
        spans, keys, masks = [], [], []
        for i in range(lead, b):
            start, count = int(starts[i]), int(lengths[i])
            end = start + count
            key_rows, _ = _sequence_rows(end, tables[i].tolist(), block_size, device)
            spans.append((int(first[i]), int(first[i]) + count))
            keys.append(key_rows)
            masks.append(None if count == 1 else "causal" if start == 0 else
                         causal_lower_right(count, end))
        # One host-to-device copy for what every layer reads.
        host = torch.cat([write, (starts[:lead] + 1), tables[:lead].clamp(min=0).reshape(-1)])
        dev = host.to(device, non_blocking=True)
        d_write, d_lens, d_tables = dev.split([n, lead, lead * tables.shape[1]])
        return cls(tuple(spans), tuple(keys), tuple(masks), d_write, lead,
                   d_tables.view(lead, tables.shape[1]), d_lens, block_size)

    @classmethod
    def decoding(cls, positions: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor,
                 block_size: int) -> "AttentionRows":
        """Rows that all decode one token, from device tensors alone (no host work and no
        sync: what a captured graph runs). positions, lens (B,); tables (B, M)."""
        write = tables.gather(1, (positions // block_size)[:, None])[:, 0] * block_size \
            + positions % block_size
        return cls((), (), (), write, tables.shape[0], tables, lens, block_size)


def packed_positions(starts: torch.Tensor, lengths: torch.Tensor):
    """(seq, pos), each (N,): the sequence and the position of every packed token of a step
    whose B sequences feed ``lengths`` tokens from ``starts`` (both (B,))."""
    seq = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return seq, torch.arange(int(lengths.sum())) - first[seq] + starts[seq]


def _sequence_rows(end: int, table: list[int], block_size: int, device):
    """Cache rows of a sequence's positions 0 .. end - 1: a slice when its blocks are
    consecutive (read in place), else an index tensor on ``device``; and the rows as a CPU
    tensor (for the write index)."""
    blocks = table[:-(-end // block_size)]
    if all(b == blocks[0] + i for i, b in enumerate(blocks)):
        base = blocks[0] * block_size
        return slice(base, base + end), torch.arange(base, base + end)
    rows = (torch.tensor(blocks)[:, None] * block_size + torch.arange(block_size)).flatten()
    return rows[:end].to(device), rows[:end]


def attend(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, rows: AttentionRows,
           out: torch.Tensor) -> None:
    """The per-sequence attention of ``rows``' spans (the CPU engine's path, and the reference
    the GPU kernel is tested against). q, out: (H, N, hd); ck, cv: (H, R, hd), one layer."""
    for (s, e), keys, mask in zip(rows.spans, rows.keys, rows.masks):
        if isinstance(keys, slice):
            kb, vb = ck[:, keys], cv[:, keys]  # (H, S, hd) views of the cache
        else:
            kb, vb = ck.index_select(1, keys), cv.index_select(1, keys)
        # 4-d: on a CPU only then does SDPA take its flash kernel (3x faster than its
        # math path for one query, measured). Softmax runs in fp32 inside.
        causal = isinstance(mask, str)
        out[:, s:e] = F.scaled_dot_product_attention(
            q[None, :, s:e], kb[None].to(q.dtype), vb[None].to(q.dtype),
            attn_mask=None if causal else mask, is_causal=causal)[0]


def decode_attention(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
                     rows: AttentionRows) -> torch.Tensor:
    """Every decode row at once: q (B, H, hd) -> (B, H, hd). The Triton kernel where it runs,
    else the same attention with fixed shapes in torch."""
    from .attention import paged_decode as pd

    fn = pd.paged_decode if pd.available(q.device) else pd.gathered
    return fn(q, ck, cv, rows.tables, rows.lens, rows.block_size)


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

    def forward(self, x, layer: int, cache: KVCache | None, rows: AttentionRows | None):
        """x: (B, T, D) causal over each row without a cache, or (N, D) packed sequences
        whose keys and values go into ``cache`` where ``rows`` says."""
        h, hd = self.num_heads, self.head_dim
        k, v, q = self.qkv_proj(x).chunk(3, dim=-1)  # each (..., H_local * hd)
        if cache is None:
            b, t, _ = x.shape
            k, v, q = (y.view(b, t, h, hd).transpose(1, 2) for y in (k, v, q))  # (B, H, T, hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(b, t, h * hd)
        else:
            n = x.shape[0]
            k, v, q = (y.view(n, h, hd).transpose(0, 1) for y in (k, v, q))  # (H, N, hd)
            ck, cv = cache.k[layer], cache.v[layer]
            ck.index_copy_(1, rows.write, k.to(ck.dtype))
            cv.index_copy_(1, rows.write, v.to(cv.dtype))
            y = torch.empty_like(q)
            if rows.decode:
                d = rows.decode
                y[:, :d] = decode_attention(q[:, :d].transpose(0, 1), ck, cv,
                                            rows).transpose(0, 1)
            attend(q, ck, cv, rows, y)
            y = y.transpose(0, 1).reshape(n, h * hd)
        return row_parallel(self.out_proj, y, self.comm)


def row_parallel(linear: nn.Module, x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """x @ W.T, summed over ranks, and the (replicated) bias added once after the sum (in
    the multiply itself when there is one rank)."""
    if comm.size == 1:
        return linear(x)
    y = comm.all_reduce(project(linear, x))
    return y + linear.bias if linear.bias is not None else y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x, layer, cache, rows):
        x = x + self.self_attn(self.self_attn_layer_norm(x), layer, cache, rows)
        h = linear_relu(self.fc1, self.final_layer_norm(x))
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
    """``model(tokens)``: (B, T) ids -> (B, T, V) logits; ``model.step(...)``: a packed step
    over the paged KV cache (the engine's)."""

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)
        self.head: nn.Module | None = None  # the tied output projection when packed (kernels)

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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of whole sequences, no cache: tokens (B, T) -> (B, T, V)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self._run(tokens, positions, None, None, None)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             rows: AttentionRows, select: torch.Tensor) -> torch.Tensor:
        """One packed step: tokens, positions (N,) of every sequence's new tokens, one after
        the other; their keys and values go into ``cache``; logits only at the packed rows
        ``select`` (S,) -> (S, V)."""
        return self._run(tokens, positions, cache, rows, select)

    def _run(self, tokens, positions, cache, rows, select) -> torch.Tensor:
        dec = self.decoder
        x = self.embed(tokens)
        if self.cfg.scale_embedding:
            x = x * self.cfg.embed_dim ** 0.5
        pos = (positions + POSITION_OFFSET).clamp(max=dec.embed_positions.weight.shape[0] - 1)
        x = x + dec.embed_positions(pos)
        backends = sdpa_kernel(list(_CUDA_ATTENTION)) if x.is_cuda else contextlib.nullcontext()
        with backends:
            for i, layer in enumerate(dec.layers):
                x = layer(x, i, cache, rows)
        if select is not None:  # project only the positions we sample from: (S, D)
            x = x.index_select(0, select)
        x = dec.layer_norm(x)
        # Tied output head: (..., D) @ (V_local, D).T, gathered so every rank sees all of V.
        local = F.linear(x, dec.embed_tokens.weight) if self.head is None else self.head(x)
        logits = dec.comm.all_gather_last(local)
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
