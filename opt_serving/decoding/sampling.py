"""Choosing the next token: pure functions of a (B, V) logits tensor, with per-row options.

Every request in a shared batch keeps its own temperature, top-p, factual-nucleus state,
penalties, min_tokens and RNG (metaseq applied one request's options to the whole batch).
The order follows metaseq's generator: temperature, then penalties, then blocking EOS and stop
tokens before min_tokens; the reported log-probs are the log-softmax of those processed logits
(before nucleus truncation), which is also what best_of ranks on.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from opt_serving.config import DICT_SIZE, EOS_ID
from opt_serving.protocol import SamplingParams, pick_best, row_fields  # noqa: F401

# Factual nucleus restarts its decay at the start of a sentence: after ".", "?" and "!".
SENTENCE_END_IDS = frozenset({4, 116, 328})


_DTYPES = {"float": torch.float32, "long": torch.long, "bool": torch.bool}


class RowParams:
    """The options of B rows as (B,) tensors, one per row field of their options type
    (declared there, once: ``protocol.options``), plus ``greedy`` (bool)."""

    def __init__(self, columns: dict[str, torch.Tensor], host: dict[str, torch.Tensor],
                 wants: Sequence[int] = ()):
        self.__dict__.update(columns)
        # The same columns on the CPU: decisions about which work a step needs (any penalty?
        # all greedy?) are taken there, without waiting for the device, and once per batch
        # (a decode step reuses its batch's RowParams), not once per step.
        self.host = host
        self.wants = tuple(wants)  # alternatives each row returns (num_logprobs)
        self.penalised = bool((host["alpha_presence"] != 0).any()
                              or (host["alpha_frequency"] != 0).any())
        self.src_penalised = bool((host["alpha_presence_src"] != 0).any()
                                  or (host["alpha_frequency_src"] != 0).any())
        self.repeated = bool((host["repetition_penalty"] != 1).any())
        self.all_greedy = bool(host["greedy"].all())
        self.greedy_rows = host["greedy"].tolist()
        self.min_tokens = bool((host["min_tokens"] > 0).any())  # some row may block EOS
        # Whether drawing reads the rows' generated tokens (counts, lengths, sentence steps).
        self.needs_history = (self.penalised or self.repeated or self.min_tokens
                              or not self.all_greedy)

    @classmethod
    def stack(cls, params: Sequence[SamplingParams], device=None) -> "RowParams":
        host = {name: torch.tensor([getattr(p, name) for p in params], dtype=_DTYPES[kind])
                for name, kind in row_fields(type(params[0]))}
        host["greedy"] = torch.tensor([p.greedy for p in params], dtype=torch.bool)
        on_cpu = device is None or torch.device(device).type == "cpu"
        return cls(host if on_cpu else {k: v.to(device) for k, v in host.items()}, host,
                   [p.num_logprobs for p in params])


def make_generator(seed: int, index: int = 0) -> torch.Generator:
    """The CPU RNG of copy ``index`` of a request (best_of copies, several prompts). Mixed
    through a hash so request seed s copy 1 and seed s+1 copy 0 are unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def draw_uniforms(generators: Sequence[torch.Generator], greedy: Sequence[bool],
                  device=None) -> torch.Tensor:
    """One U[0, 1) per sampling row from its own generator, so a row's draws do not depend on
    which other requests share the batch; greedy rows draw nothing.  # (B,)"""
    u = [0.0 if g else torch.rand((), generator=gen).item()
         for gen, g in zip(generators, greedy)]
    return torch.tensor(u, dtype=torch.float64, device=device)


def token_counts(rows: Sequence[Sequence[int]], vocab_size: int, device=None) -> torch.Tensor:
    """How often each id occurs in each row.  # (B, V) float32"""
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    row_idx = [r for r, ids in enumerate(rows) for _ in ids]
    if row_idx:
        col_idx = [t for ids in rows for t in ids]
        counts.index_put_((torch.tensor(row_idx, device=device),
                           torch.tensor(col_idx, device=device)),
                          torch.ones(len(col_idx), device=device), accumulate=True)
    return counts


def source_tokens(prompt: Sequence[int], end_idx: int, dropped: int = 0) -> Sequence[int]:
    """The prompt tokens the ``_src`` penalties count. ``prompt`` is what the model sees
    (without the leading </s>); ``end_idx`` counts in the prompt as sent, of which ``dropped``
    tokens were cut from the left."""
    if end_idx < 0:
        return prompt
    return prompt[:max(0, end_idx - dropped)]


def sentence_steps(generated: Sequence[int]) -> int:
    """Tokens generated since the last sentence end (the t - 1 of factual nucleus)."""
    for back, token in enumerate(reversed(generated)):
        if token in SENTENCE_END_IDS:
            return back
    return len(generated)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Rows with temperature 0 are greedy and keep their logits.  # (B, V)"""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None]


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """logit[j] -= count_j * frequency + (count_j > 0) * presence, per row.  # (B, V)"""
    return logits - counts * frequency[:, None] - (counts > 0) * presence[:, None]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """Where ``seen`` (B, V): positive logits / penalty, negative ones * penalty (HF's
    RepetitionPenaltyLogitsProcessor, per row).  # (B, V)"""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def block_tokens(logits: torch.Tensor, rows: torch.Tensor,
                 ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """-inf at ``ids[b]`` for the rows b where ``rows[b]`` is true, in place (only the
    blocked positions are written, no (B, V) mask).  # (B, V)"""
    at = [(b, t) for b, (on, row_ids) in enumerate(zip(rows.tolist(), ids)) if on
          for t in row_ids]
    if at:
        index = torch.tensor(at, device=logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")
    return logits


def process_logits(logits: torch.Tensor, rp: RowParams, *,
                   generated_counts: torch.Tensor | None, source_counts: torch.Tensor | None,
                   n_generated: torch.Tensor | None, stop_ids: Sequence[Sequence[int]],
                   seen: torch.Tensor | None = None, eos_id: int = EOS_ID,
                   dict_size: int = DICT_SIZE) -> torch.Tensor:
    """The distribution tokens are drawn from (and log-probs reported on).  # (B, V) float32

    Counts are ``token_counts`` (B, V), None when no row has that penalty; ``seen`` (B, V)
    bool: ids in each row's prompt or output, None when no row has a repetition penalty.
    ``stop_ids[b]``: single-token stop sequences of row b, blocked with EOS while
    ``n_generated < min_tokens``.
    """
    x = logits.float()
    if seen is not None:  # on the raw logits, before temperature, as HF and vLLM do
        x = apply_repetition_penalty(x, seen, rp.repetition_penalty)
    x = apply_temperature(x, rp.temperature)  # a new tensor: safe to edit
    # Dictionary padding (50265..50271) decodes to "": never produce it (metaseq #12).
    if x.shape[-1] > dict_size:
        x[:, dict_size:] = float("-inf")
    if generated_counts is not None:
        x = apply_penalties(x, generated_counts, rp.alpha_presence, rp.alpha_frequency)
    if source_counts is not None:
        x = apply_penalties(x, source_counts, rp.alpha_presence_src, rp.alpha_frequency_src)
    if not rp.min_tokens:
        return x
    early = n_generated.cpu() < rp.host["min_tokens"]  # (host) no device sync
    return block_tokens(x, early, [(eos_id, *ids) for ids in stop_ids])  # x is ours


def nucleus_top_p(rp: RowParams, steps: torch.Tensor) -> torch.Tensor:
    """Per-row top-p of this step: p0 * lambda^(t-1), floored at omega, when factual nucleus
    is on (lambda > 0); ``steps`` = t - 1 (``sentence_steps``).  # (B,)"""
    decayed = rp.top_p * rp.lambda_decay.clamp(min=1e-9) ** steps.to(rp.top_p.dtype)
    decayed = torch.maximum(decayed, rp.omega_bound)
    return torch.where(rp.lambda_decay > 0, decayed, rp.top_p)


def sample(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token per row: argmax for greedy rows, else inverse-CDF sampling of the nucleus
    (the smallest top set whose mass reaches top_p, at most top_k tokens) with the row's own
    uniform draw.  # (B,) long"""
    best = logits.max(dim=-1).indices  # the first maximum, as argmax; 3x faster on a CPU
    if bool(greedy.all()):
        return best
    probs = torch.softmax(logits.float(), dim=-1)
    drawn = best.clone()
    u = uniforms.to(logits.device)
    # A row that keeps the whole distribution needs no sort (a sort of 50k ids costs ~9 ms a
    # row on a CPU): inverse-CDF in id order. The choice depends only on the row's own
    # options, so a row samples the same alone or in any batch.
    whole = ~greedy & (top_p >= 1) & (top_k <= 0)
    if bool(whole.any()):
        rows = whole.nonzero()[:, 0]
        cdf = probs[rows].double().cumsum(dim=-1)  # (b, V)
        pick = torch.searchsorted(cdf, u[rows, None] * cdf[:, -1:], right=True)[:, 0]
        # Rounding can put the target past the last step: stay on the last possible id (never
        # on a zero-probability padding symbol).
        last = probs.shape[-1] - 1 - (probs[rows].flip(-1) > 0).int().argmax(dim=-1)
        drawn[rows] = torch.minimum(pick, last)
    nucleus = ~greedy & ~whole
    if bool(nucleus.any()):
        rows = nucleus.nonzero()[:, 0]
        drawn[rows] = _sample_nucleus(probs[rows], top_p[rows], top_k[rows], u[rows])
    return torch.where(greedy, best, drawn)


def _sample_nucleus(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                    uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of the smallest top set reaching top_p (at most top_k).  # (b,)"""
    sprobs, sidx = probs.sort(dim=-1, descending=True)  # (b, V)
    before = sprobs.cumsum(dim=-1) - sprobs  # mass of the strictly more likely tokens
    keep = before < top_p[:, None]
    rank = torch.arange(sprobs.shape[-1], device=probs.device)
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    keep[:, 0] = True
    cdf = (sprobs * keep).double().cumsum(dim=-1)  # (b, V), flat past the nucleus
    target = uniforms[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True)[:, 0]
    # Rounding can put target on the last step of the cdf: stay inside the nucleus.
    choice = torch.minimum(choice, keep.sum(dim=-1) - 1)
    return sidx.gather(1, choice[:, None])[:, 0]


def next_tokens(logits: torch.Tensor, rp: RowParams, *, generated: Sequence[Sequence[int]],
                sources: Sequence[Sequence[int]], stop_ids: Sequence[Sequence[int]],
                generators: Sequence[torch.Generator],
                prompts: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step for B rows: (tokens (B,), log-probs (B, V) of the processed
    distribution). ``generated[b]``: row b's tokens so far; ``sources[b]``: its
    ``source_tokens``; ``prompts[b]``: its model input (for the repetition penalty)."""
    device, vocab = logits.device, logits.shape[-1]
    # Counting is (B, V) work per step: skip it when no row is penalised (decided on the host).
    seen = None
    if rp.repeated:
        rows = [(*p, *g) for p, g in zip(prompts or [()] * len(generated), generated)]
        seen = token_counts(rows, vocab, device) > 0
    processed = process_logits(
        logits, rp, seen=seen,
        generated_counts=token_counts(generated, vocab, device) if rp.penalised else None,
        source_counts=token_counts(sources, vocab, device) if rp.src_penalised else None,
        n_generated=torch.tensor([len(g) for g in generated]) if rp.min_tokens else None,
        stop_ids=stop_ids)
    if rp.all_greedy:  # the argmax stays on the device until the step's one copy
        return processed.max(dim=-1).indices, log_probs(processed)
    steps = torch.tensor([sentence_steps(g) for g in generated], device=device)
    uniforms = draw_uniforms(generators, rp.greedy_rows, device)
    tokens = sample(processed, nucleus_top_p(rp, steps), rp.top_k, rp.greedy, uniforms)
    return tokens, log_probs(processed)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """# (..., V) float32"""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logprobs[..., ids]: e.g. echo's teacher-forced scores with
    ``gather_logprobs(log_probs(logits[:, :-1]), tokens[:, 1:])``.  # (...)"""
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (log-prob, id) per position, best first.  # (..., k) each"""
    return tuple(logprobs.topk(k, dim=-1))
