"""Paged decode attention: every decode row of a step in one call per layer, reading the paged
KV cache in place through block tables (SGLang's two-stage split-KV design, vLLM's layout).

Math, per row b and head h, with n = seq_lens[b] keys at positions 0 .. n-1:

    key j lives in cache row  tables[b, j // bs] * bs + j % bs
    out[b, h] = softmax(q[b, h] . K[h, rows]^T * scale) @ V[h, rows]

Shapes: q (B, H, D); k_cache, v_cache (H, R, D) with R = num_blocks * bs (``model.KVCache``'s
layout, one layer); tables (B, M) int32 (entries past a row's last block are never read);
seq_lens (B,) int32 >= 1; out (B, H, D) in q's dtype.

Stage 1 runs a (B, H, splits) grid: program (b, h, s) takes the s-th share of row b's keys in
tiles of BLOCK_N, keeps an fp32 online softmax, and writes its partial output and log-sum-exp
(an empty share writes -inf). Stage 2, a (B, H) grid, merges the shares. Splitting a long
context over several programs keeps the GPU busy when B x H is small (batch 1: 32 programs
for OPT-6.7B without it). The grid depends only on B, H and ``splits``: a CUDA graph captured
at a batch size replays for any lengths.

``TRITON_INTERPRET=1`` set before this module is imported runs the kernels on CPU tensors
(numpy emulation): that is how the CPU test suite checks them against the CPU engine's own
per-sequence attention (``model.attend``). ``gathered`` is the same attention in plain torch
with fixed shapes, for devices without the kernel.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: ``reference`` is then the only path
    triton = None

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel runs for tensors on ``device``."""
    return triton is not None and (device.type == "cuda" or INTERPRETING)


def gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """The same again with fixed shapes (every row gathers M x bs keys, masked by its length):
    no host sync, so it can be captured in a graph where the kernel is not available."""
    b, m = tables.shape
    pos = torch.arange(m * block_size, device=q.device)  # (S,)
    rows = tables.long().repeat_interleave(block_size, dim=1) * block_size + pos % block_size
    k = k_cache[:, rows.clamp(min=0)].to(q.dtype).transpose(0, 1)  # (B, H, S, D)
    v = v_cache[:, rows.clamp(min=0)].to(q.dtype).transpose(0, 1)
    mask = (pos[None, :] < seq_lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask)[:, :, 0]


if triton is not None:
    @triton.jit
    def _stage1(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, part_ptr, lse_ptr,
                stride_qb, stride_qh, stride_ch, stride_tb, scale,
                H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                BS: tl.constexpr, SPLITS: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tl.load(lens_ptr + b)
        share = tl.cdiv(n, SPLITS)
        start = s * share
        end = tl.minimum(start + share, n)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0)
        q = q.to(tl.float32) * scale
        head = h.to(tl.int64) * stride_ch  # a head's slice of a large cache passes 2^31
        m_i = tl.full([], -float("inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            kmask = offs < end
            block = tl.load(tables_ptr + b * stride_tb + offs // BS, mask=kmask, other=0)
            rows = block.to(tl.int64) * BS + offs % BS
            at = head + rows[:, None] * D + d[None, :]
            both = kmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + at, mask=both, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            scores = tl.sum(q[None, :] * k, 1)
            scores = tl.where(kmask, scores, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            v = tl.load(v_ptr + at, mask=both, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
        at = (b * H + h) * SPLITS + s
        empty = end <= start  # then acc is 0 and l_i 0: write 0 and a log-sum-exp of -inf
        l_safe = tl.maximum(l_i, 1e-30)
        tl.store(part_ptr + at * BLOCK_D + d, acc / l_safe)
        tl.store(lse_ptr + at, tl.where(empty, -float("inf"), m_i + tl.log(l_safe)))

    @triton.jit
    def _stage2(part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh,
                H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        base = (b * H + h) * SPLITS
        lse = tl.load(lse_ptr + base + s, mask=s < SPLITS, other=-float("inf"))
        w = tl.exp(lse - tl.max(lse, 0))
        part = tl.load(part_ptr + (base + s[:, None]) * BLOCK_D + d[None, :],
                       mask=(s < SPLITS)[:, None], other=0.0)
        o = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
                 mask=d < D)


def default_splits(batch: int, heads: int, sms: int = 132) -> int:
    """Shares per row: enough programs to fill the GPU's SMs twice over at small batches,
    one share once B x H alone does (SGLang's heuristic, capped at 8)."""
    return max(1, min(8, (2 * sms) // max(1, batch * heads)))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                 splits: int | None = None, block_n: int = 16) -> torch.Tensor:
    """Attention of one query row per sequence over its paged keys (module docstring)."""
    b, h, d = q.shape
    splits = splits or default_splits(b, h)
    block_d = triton.next_power_of_2(d)
    part = torch.empty(b, h, splits, block_d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _stage1[(b, h, splits)](q, k_cache, v_cache, tables, seq_lens, part, lse,
                            q.stride(0), q.stride(1), k_cache.stride(0), tables.stride(0),
                            1.0 / math.sqrt(d), H=h, D=d, BLOCK_D=block_d, BLOCK_N=block_n,
                            BS=block_size, SPLITS=splits)
    _stage2[(b, h)](part, lse, out, out.stride(0), out.stride(1), H=h, D=d, BLOCK_D=block_d,
                    SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits))
    return out
