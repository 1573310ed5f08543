"""Capacity of a BlenderBot 1 on one GPU (``opt-capacity --model blender-3b``): pure arithmetic
over ``blenderbot.config`` (shapes) and ``gpus``.

No tensor parallelism: the largest (9.4B) is 18.8 GB in fp16. Memory is vLLM's rule as for OPT
(memory x utilisation - weights - reserve is left for requests); a request holds its worst case,
the engine's group slot: k beams x the reply limit of self-attention keys and values, plus the
encoder's keys and values once. Decode is bandwidth bound: every step reads the decoder's
weights and the output embedding once, and every running beam's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt_serving.blenderbot.config import PRESETS, BlenderbotConfig

from .gpus import GIB, GPU
from .planner import (DEFAULT_EFFICIENCY, DEFAULT_RESERVE_BYTES, DEFAULT_UTILISATION,
                      CapacityError, get_dtype)


def is_seq2seq(name: str) -> bool:
    return name.lower() in PRESETS


@dataclass(frozen=True)
class Seq2SeqRequest:
    cfg: BlenderbotConfig
    gpu: GPU
    dtype: str = "fp16"
    beams: int = 10  # gen/blenderbot's beam size
    context: int | None = None  # encoder tokens (ParlAI's text_truncate); None: positions
    reply: int | None = None  # reply tokens at most (label_truncate); None: positions
    typical_reply: int = 24  # steps an average reply takes (beam_min_length 20 + a few)
    concurrency: int = 32  # requests decoded together
    utilisation: float = DEFAULT_UTILISATION
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    efficiency: float = DEFAULT_EFFICIENCY

    def __post_init__(self):
        object.__setattr__(self, "dtype", get_dtype(self.dtype).name)
        if self.dtype == "int8":
            raise CapacityError("int8 weights are OPT's; BlenderBot runs in fp32, fp16 or bf16")
        top = self.cfg.max_positions
        for name in ("context", "reply"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= top:
                raise CapacityError(f"{name} {v} is outside 1..{top}: {self.cfg.name} has "
                                    f"{top} learned positions")
        for name in ("beams", "typical_reply", "concurrency"):
            if getattr(self, name) < 1:
                raise CapacityError(f"{name} must be at least 1")
        for name in ("utilisation", "efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise CapacityError(f"{name} must be in (0, 1]")


@dataclass(frozen=True)
class Seq2SeqPlan:
    request: Seq2SeqRequest
    weights_bytes: int
    request_bytes: int  # one request's worst case (its group slot)
    budget_bytes: int  # what is left for requests
    max_requests: int  # requests the budget holds at once
    fits: bool  # the weights and ``concurrency`` requests fit
    step_ms: float  # one decode step at ``concurrency`` requests (estimate)
    reply_ms: float  # a typical reply alone (estimate)
    replies_per_s: float  # at ``concurrency`` requests (estimate)

    def to_dict(self) -> dict:
        r = self.request
        return {"model": r.cfg.name, "gpu": r.gpu.name, "dtype": r.dtype, "beams": r.beams,
                "context": r.context or r.cfg.max_positions,
                "reply": r.reply or r.cfg.max_positions, "concurrency": r.concurrency,
                "parameters": r.cfg.param_count(), "weights_bytes": self.weights_bytes,
                "request_bytes": self.request_bytes, "budget_bytes": self.budget_bytes,
                "max_requests": self.max_requests, "fits": self.fits,
                "step_ms": self.step_ms, "reply_ms": self.reply_ms,
                "replies_per_s": self.replies_per_s}


def step_seconds(req: Seq2SeqRequest, requests: int, at_step: int) -> float:
    """A decode step of ``requests`` requests ``at_step`` tokens into their replies."""
    cfg, itemsize = req.cfg, get_dtype(req.dtype).act_bytes
    context = req.context or cfg.max_positions
    kv = requests * cfg.kv_bytes(req.beams, at_step, context, itemsize)
    return (cfg.step_params() * itemsize + kv) / req.gpu.bandwidth_bytes_per_s \
        / req.efficiency


def plan_seq2seq(req: Seq2SeqRequest) -> Seq2SeqPlan:
    cfg, itemsize = req.cfg, get_dtype(req.dtype).act_bytes
    weights = cfg.param_count() * itemsize
    context, reply = req.context or cfg.max_positions, req.reply or cfg.max_positions
    # The keys and values, the beams' tables (an int64 arena row per position: the engine's
    # default, beams sharing keys) and the context's mask (a bool per position).
    per_request = cfg.kv_bytes(req.beams, reply, context, itemsize) + 8 * req.beams * reply \
        + context
    budget = int(req.gpu.memory_bytes * req.utilisation) - weights - req.reserve_bytes
    most = max(0, budget // per_request)
    steps = req.typical_reply
    mean = sum(step_seconds(req, req.concurrency, t) for t in range(1, steps + 1)) / steps
    alone = sum(step_seconds(req, 1, t) for t in range(1, steps + 1))
    return Seq2SeqPlan(req, weights, per_request, budget, most,
                       most >= req.concurrency, mean * 1e3, alone * 1e3,
                       req.concurrency / (mean * steps))


def format_seq2seq(p: Seq2SeqPlan) -> str:
    r = p.request
    g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    verdict = (f"fits: {p.max_requests} requests at once" if p.fits else
               "does not fit: the weights alone exceed the memory" if p.budget_bytes <= 0 else
               f"does not fit {r.concurrency} requests: at most {p.max_requests} at once")
    rows = [
        ("model", f"{r.cfg.name} ({r.cfg.param_count() / 1e9:.2f} B parameters, "
                  f"{r.cfg.variant}), {r.dtype}, one {r.gpu.description}"),
        ("weights", g(p.weights_bytes)),
        ("per request", f"{g(p.request_bytes)} (beam {r.beams}, "
                        f"{r.reply or r.cfg.max_positions} reply tokens, "
                        f"{r.context or r.cfg.max_positions} context tokens)"),
        ("for requests", g(max(0, p.budget_bytes))),
        ("verdict", verdict),
        ("decode step", f"{p.step_ms:.2f} ms at {r.concurrency} requests (estimate)"),
        ("one reply", f"{p.reply_ms:.0f} ms alone, {r.typical_reply} steps (estimate)"),
        ("throughput", f"{p.replies_per_s:.1f} replies/s at {r.concurrency} requests "
                       f"(estimate)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def seq2seq_preset(name: str) -> BlenderbotConfig:
    return PRESETS[name.lower()]

