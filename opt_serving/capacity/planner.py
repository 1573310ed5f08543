"""The capacity planner: will an OPT / BB3 model fit these GPUs, and how fast can it go?

Pure arithmetic over ``OPTConfig`` (shapes), ``split_rules`` (what each rank holds) and
``gpus`` (memory, bandwidth, throughput). ``plan`` answers ``opt-capacity``; ``kv_cache_tokens``
is the same budget rule for a server sizing its KV cache from the memory it sees, so the
planner and the server agree on one number.

The memory rule is vLLM's: ``memory * utilisation - weights - activation workspace - reserve``
is left for the KV cache, per GPU. Decode is bandwidth bound (every step reads each weight
once plus the cache); prefill is compute bound.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass

from ..config import DTYPES as TORCH_DTYPES, OPTConfig
from .gpus import GIB, GPU
from ..split_rules import is_buffer, rule_for, sharded_shape

# CUDA context (0.3-0.5 GiB), NCCL buffers and allocator fragmentation: memory the framework
# never sees as tensors (vLLM profiles it as "non-torch memory").
DEFAULT_RESERVE_BYTES = 1 * GIB
DEFAULT_UTILISATION = 0.9  # vLLM's gpu_memory_utilization default
# metaseq's MAX_BATCH_TOKENS: the most tokens one forward pass processes, so the size of the
# activation workspace (a 2048-token prompt plus decoding rows fits under it).
DEFAULT_MAX_BATCH_TOKENS = 3072
LOGIT_BYTES = 4  # logits are upcast to fp32 for softmax / sampling
# Decode estimate, fitted to FasterTransformer's published OPT figures: 40.5 ms for 175B
# at MP8, 11 ms for 30B at MP8, 23 ms for 30B at MP2 against bounds of 21.4, 3.7 and 14.7 ms.
# Two all-reduces per layer explain why MP8 loses so much more than MP2 on the small model;
# a single efficiency cannot fit both.
DEFAULT_EFFICIENCY = 0.75
DEFAULT_ALLREDUCE_US = 64.0


class CapacityError(ValueError):
    """Input the planner cannot answer: the message says what is wrong and what is valid."""


@dataclass(frozen=True)
class DType:
    name: str
    weight_bytes: int  # matrix weights
    act_bytes: int  # everything else: biases, norms, embeddings, activations, the KV cache


# The serving dtypes by the same names as everywhere (config.DTYPES), their sizes from torch;
# plus weight-only int8 (LLM.int8 / GPTQ style): Linear weights in int8 with an fp16 scale per
# output row; embeddings, norms, activations and the KV cache stay fp16.
DTYPES: types.MappingProxyType[str, DType] = types.MappingProxyType({
    **{name: DType(name, t.itemsize, t.itemsize) for name, t in TORCH_DTYPES.items()},
    "int8": DType("int8", 1, 2)})


def get_dtype(name: str) -> DType:
    key = {"int8-weights": "int8", "float16": "fp16", "half": "fp16", "float32": "fp32",
           "bfloat16": "bf16"}.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise CapacityError(f"unknown dtype {name!r}; valid: fp32, fp16, bf16, int8-weights")
    return DTYPES[key]


@dataclass(frozen=True)
class CapacityRequest:
    cfg: OPTConfig
    gpu: GPU
    dtype: str = "fp16"
    mp: int | None = None  # None: the smallest valid degree that fits
    context: int | None = None  # tokens per sequence (prompt + reply); None: max positions
    concurrency: int = 1  # full-context sequences to hold at once
    utilisation: float = DEFAULT_UTILISATION
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    gpus_per_node: int = 8
    efficiency: float = DEFAULT_EFFICIENCY
    allreduce_us: float = DEFAULT_ALLREDUCE_US

    def __post_init__(self):
        # Frozen, so normalise the spelling ("int8-weights", "half") the one allowed way.
        object.__setattr__(self, "dtype", get_dtype(self.dtype).name)
        cfg = self.cfg
        if self.context is not None and not 1 <= self.context <= cfg.max_positions:
            raise CapacityError(f"context {self.context} is outside 1..{cfg.max_positions}: "
                                f"{cfg.name} has {cfg.max_positions} learned positions")
        if self.mp is not None:
            try:
                cfg.check_mp(self.mp)
            except ValueError as e:
                raise CapacityError(str(e)) from None
        for field, low, high in (("utilisation", 0.0, 1.0), ("efficiency", 0.0, 1.0)):
            if not low < getattr(self, field) <= high:
                raise CapacityError(f"{field} must be in (0, 1], got {getattr(self, field)}")
        for field in ("concurrency", "max_batch_tokens", "gpus_per_node"):
            if getattr(self, field) < 1:
                raise CapacityError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.reserve_bytes < 0 or self.allreduce_us < 0:
            raise CapacityError("reserve and all-reduce latency cannot be negative")

    @property
    def seq_len(self) -> int:
        return self.context or self.cfg.max_positions


# -- memory --------------------------------------------------------------------------------


def weight_bytes_per_gpu(cfg: OPTConfig, mp: int, dtype: DType) -> int:
    """Bytes of parameters one rank of ``mp`` holds, from the resharder's split rules.

    Replicated tensors (positions, norms, row-parallel biases) are counted on every rank,
    which is why this is slightly more than total / mp.
    """
    total = 0
    for name, shape in cfg.param_shapes().items():
        if is_buffer(name):
            continue
        local = sharded_shape(rule_for(name), shape, mp)
        n = math.prod(local)
        if name.startswith("decoder.layers.") and len(local) == 2:  # a Linear weight
            total += n * dtype.weight_bytes
            if dtype.weight_bytes < dtype.act_bytes:  # quantised: one scale per output row
                total += local[0] * dtype.act_bytes
        else:
            total += n * dtype.act_bytes
    return total


@dataclass(frozen=True)
class Workspace:
    """Per-GPU activation memory of the largest forward pass (``tokens`` rows at once)."""

    tokens: int
    logits: int  # T x V x 4 B: gathered over the vocabulary, so every rank holds all of V
    mlp: int  # T x ffn/M x dtype: fc1's output on this rank
    hidden: int  # T x (h + 3h/M) x dtype: the residual stream and this rank's q, k, v

    @property
    def total(self) -> int:
        return self.logits + self.mlp + self.hidden


def workspace(cfg: OPTConfig, mp: int, tokens: int, act_bytes: int) -> Workspace:
    return Workspace(tokens=tokens, logits=tokens * cfg.vocab_size * LOGIT_BYTES,
                     mlp=tokens * cfg.ffn_dim // mp * act_bytes,
                     hidden=tokens * (cfg.embed_dim + 3 * cfg.embed_dim // mp) * act_bytes)


def kv_bytes_per_token_per_gpu(cfg: OPTConfig, mp: int, act_bytes: int) -> int:
    # Heads split evenly over ranks, so each rank caches 1/M of every layer's K and V.
    return cfg.kv_bytes_per_token(act_bytes) // mp


def kv_budget_bytes(memory_bytes: int, utilisation: float, weights: int, work: int,
                    reserve_bytes: int) -> int:
    """vLLM's rule: what is left for the KV cache under the utilisation cap (may be < 0)."""
    return int(memory_bytes * utilisation) - weights - work - reserve_bytes


def kv_cache_tokens(cfg: OPTConfig, mp: int, free_bytes: int, dtype_bytes: int,
                    max_batch_tokens: int, utilisation: float = DEFAULT_UTILISATION,
                    reserve_bytes: int = DEFAULT_RESERVE_BYTES, *,
                    weight_bytes: int | None = None) -> int:
    """How many tokens of KV cache one rank of an ``mp``-way model should allocate.

    The same rule ``opt-capacity`` reports, so a server's start-up log and the planner agree.

    free_bytes: memory this process may use on one GPU *including* the weights: the device
        total on a dedicated GPU, or ``torch.cuda.mem_get_info()[0]`` measured before the
        weights are loaded. (After loading, pass ``free + torch.cuda.memory_allocated()``.)
    dtype_bytes: bytes per element of the KV cache and activations (2 for fp16/bf16).
    max_batch_tokens: the most tokens one forward pass will process; sizes the workspace.
    utilisation: fraction of ``free_bytes`` the process may fill (vLLM's 0.9).
    reserve_bytes: memory outside tensors (CUDA context, NCCL, fragmentation).
    weight_bytes: this rank's weights as actually loaded (e.g. int8); default: computed from
        ``cfg`` at ``dtype_bytes`` per element.

    Returns the number of token positions (for all layers, this rank's heads) that fit; 0 if
    nothing is left. One sequence of L tokens needs L of them.
    """
    dtype = DType(f"{dtype_bytes}B", dtype_bytes, dtype_bytes)
    if weight_bytes is None:
        weight_bytes = weight_bytes_per_gpu(cfg, mp, dtype)
    work = workspace(cfg, mp, max_batch_tokens, dtype_bytes).total
    budget = kv_budget_bytes(free_bytes, utilisation, weight_bytes, work, reserve_bytes)
    return max(0, budget // kv_bytes_per_token_per_gpu(cfg, mp, dtype_bytes))


# -- speed ---------------------------------------------------------------------------------


def prefill_flops(cfg: OPTConfig, tokens: int) -> float:
    """Matmul FLOPs of one prompt: 2 per parameter per token, plus attention's T^2 terms."""
    return 2 * cfg.param_count() * tokens + 2 * cfg.num_layers * tokens ** 2 * cfg.embed_dim


def decode_flops_per_token(cfg: OPTConfig, context: int) -> float:
    # 2 per parameter, plus q.k and p.v over the context (2 x 2 x layers x context x h).
    return 2 * cfg.param_count() + 4 * cfg.num_layers * context * cfg.embed_dim


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DegreeSummary:
    mp: int
    weights_bytes_per_gpu: int
    workspace_bytes: int
    kv_budget_bytes: int  # negative when the weights and workspace alone overflow
    kv_budget_tokens: int
    sequences: int  # full-context sequences one replica holds
    decode_floor_ms: float


@dataclass(frozen=True)
class CapacityPlan:
    request: CapacityRequest
    mp: int
    valid_mp: tuple[int, ...]
    smallest_fit: int | None  # smallest degree holding ``concurrency`` sequences (else one)
    params: int
    weights_bytes: int  # the whole model at this dtype
    weights_bytes_per_gpu: int
    workspace: Workspace
    usable_bytes: int  # memory x utilisation, per GPU
    kv_bytes_per_token_per_gpu: int
    kv_budget_bytes: int
    kv_budget_tokens: int
    sequences: int
    replicas: int
    gpus: int
    nodes: int
    batch: int  # sequences decoded together on one replica
    decode_floor_ms: float  # batch 1, empty cache: the weights alone over the bandwidth
    decode_bound_ms: float  # ``batch`` sequences at full context
    decode_estimate_ms: float
    tokens_per_s: float  # per replica, at the estimate
    prefill_bound_s: float  # one full-context prompt at peak throughput
    fits: bool
    verdict: str
    notes: tuple[str, ...]
    alternatives: tuple[DegreeSummary, ...]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["request"]["cfg"] = self.request.cfg.name
        out["workspace"]["total"] = self.workspace.total
        return out


def _summary(req: CapacityRequest, mp: int) -> DegreeSummary:
    cfg, dtype = req.cfg, get_dtype(req.dtype)
    weights = weight_bytes_per_gpu(cfg, mp, dtype)
    work = workspace(cfg, mp, req.max_batch_tokens, dtype.act_bytes).total
    budget = kv_budget_bytes(req.gpu.memory_bytes, req.utilisation, weights, work,
                             req.reserve_bytes)
    tokens = max(0, budget // kv_bytes_per_token_per_gpu(cfg, mp, dtype.act_bytes))
    floor = weights / req.gpu.bandwidth_bytes_per_s * 1e3
    return DegreeSummary(mp, weights, work, budget, tokens, tokens // req.seq_len, floor)


def decode_step_seconds(plan: CapacityPlan, batch: int, context: int,
                        estimate: bool = True) -> float:
    """One decode step of ``batch`` sequences ``context`` tokens long, on one replica.

    The bound is the roofline: the larger of reading weights + cache at full bandwidth and the
    matmuls at peak throughput. The estimate divides by the efficiency and adds the
    all-reduce latency (two per layer when the model is split).
    """
    req = plan.request
    read = plan.weights_bytes_per_gpu + batch * context * plan.kv_bytes_per_token_per_gpu
    memory_s = read / req.gpu.bandwidth_bytes_per_s
    tflops = req.gpu.tflops(get_dtype(req.dtype).name)
    compute_s = batch * decode_flops_per_token(req.cfg, context) / (plan.mp * tflops * 1e12)
    step = max(memory_s, compute_s)
    if not estimate:
        return step
    allreduce = 2 * req.cfg.num_layers * req.allreduce_us * 1e-6 if plan.mp > 1 else 0.0
    return step / req.efficiency + allreduce


def _nodes(replicas: int, mp: int, per_node: int) -> int:
    if mp > per_node:
        return replicas * math.ceil(mp / per_node)
    return math.ceil(replicas / (per_node // mp))


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _verdict(req: CapacityRequest, s: DegreeSummary, replicas: int) -> str:
    gpu, cap = req.gpu, req.gpu.memory_bytes * req.utilisation
    if s.weights_bytes_per_gpu > cap:
        return (f"does not fit: weights need {_gib(s.weights_bytes_per_gpu)} per GPU, "
                f"{gpu.memory_gib:g} GiB available ({_gib(cap)} under the "
                f"{req.utilisation:g} utilisation cap)")
    per_seq = req.seq_len * kv_bytes_per_token_per_gpu(req.cfg, s.mp, DTYPES[req.dtype].act_bytes)
    if s.sequences < 1:
        left = max(0, s.kv_budget_bytes)
        return (f"does not fit: after {_gib(s.weights_bytes_per_gpu)} of weights, "
                f"{_gib(s.workspace_bytes)} of activation workspace and "
                f"{_gib(req.reserve_bytes)} reserve, {_gib(left)} per GPU is left for the KV "
                f"cache ({s.kv_budget_tokens:,} tokens); one {req.seq_len}-token sequence "
                f"needs {_gib(per_seq)}")
    text = (f"fits: {s.sequences} concurrent {req.seq_len}-token sequences per replica of "
            f"{s.mp} GPU{'s' if s.mp > 1 else ''} (KV cache {_gib(max(0, s.kv_budget_bytes))} "
            f"= {s.kv_budget_tokens:,} tokens per GPU)")
    if replicas > 1:
        text += (f"; {req.concurrency} sequences need {replicas} replicas "
                 f"({replicas * s.mp} GPUs)")
    return text


def plan(req: CapacityRequest) -> CapacityPlan:
    """Plan ``req`` at its degree, or at the smallest valid degree that fits."""
    cfg, dtype = req.cfg, get_dtype(req.dtype)
    valid = tuple(cfg.valid_mp_degrees())
    summaries = tuple(_summary(req, m) for m in valid)
    holds_all = [s.mp for s in summaries if s.sequences >= req.concurrency]
    holds_one = [s.mp for s in summaries if s.sequences >= 1]
    smallest = (holds_all or holds_one or [None])[0]
    mp = req.mp or smallest or valid[-1]
    s = next(x for x in summaries if x.mp == mp)

    replicas = math.ceil(req.concurrency / s.sequences) if s.sequences else 1
    batch = max(1, min(req.concurrency, s.sequences))
    kv_tok = kv_bytes_per_token_per_gpu(cfg, mp, dtype.act_bytes)
    tflops = req.gpu.tflops(dtype.name)
    notes = []
    if dtype.name == "int8":
        notes.append("int8 weights: the KV cache and activations stay fp16; prefill assumes "
                     "fp16 matmul throughput")
    if mp > req.gpus_per_node:
        notes.append(f"MP {mp} spans {math.ceil(mp / req.gpus_per_node)} nodes: every "
                     f"all-reduce crosses the network, expect decode well above the estimate")
    if req.mp and smallest and smallest != req.mp:
        notes.append(f"the smallest degree that fits is {smallest}")
    plan_ = CapacityPlan(
        request=req, mp=mp, valid_mp=valid, smallest_fit=smallest, params=cfg.param_count(),
        weights_bytes=weight_bytes_per_gpu(cfg, 1, dtype),
        weights_bytes_per_gpu=s.weights_bytes_per_gpu,
        workspace=workspace(cfg, mp, req.max_batch_tokens, dtype.act_bytes),
        usable_bytes=int(req.gpu.memory_bytes * req.utilisation),
        kv_bytes_per_token_per_gpu=kv_tok, kv_budget_bytes=s.kv_budget_bytes,
        kv_budget_tokens=s.kv_budget_tokens, sequences=s.sequences, replicas=replicas,
        gpus=replicas * mp, nodes=_nodes(replicas, mp, req.gpus_per_node), batch=batch,
        decode_floor_ms=s.decode_floor_ms, decode_bound_ms=0.0, decode_estimate_ms=0.0,
        tokens_per_s=0.0,
        prefill_bound_s=prefill_flops(cfg, req.seq_len) / (mp * tflops * 1e12),
        fits=s.sequences >= 1, verdict=_verdict(req, s, replicas), notes=tuple(notes),
        alternatives=summaries)
    bound = decode_step_seconds(plan_, batch, req.seq_len, estimate=False)
    est = decode_step_seconds(plan_, batch, req.seq_len)
    return dataclasses.replace(plan_, decode_bound_ms=bound * 1e3, decode_estimate_ms=est * 1e3,
                               tokens_per_s=batch / est)


def throughput_curve(p: CapacityPlan, batches: list[int]) -> list[tuple[int, float, float]]:
    """(batch, tokens/s at the bound, tokens/s at the estimate) per replica, full context."""
    ctx = p.request.seq_len
    return [(b, b / decode_step_seconds(p, b, ctx, estimate=False),
             b / decode_step_seconds(p, b, ctx)) for b in batches]
