"""The decoding options, torch-free: ``SamplingParams`` and the table its fields carry.

Each field says once what it is on the wire: its kind, its default, its bounds (numbers, or
the name of a ``ServiceConstants`` limit), an OpenAI alias, and whether the sampler needs it
as a per-row tensor. Parsing a request, the list of known field names and the sampler's
``RowParams`` are all derived from that table, so a new option is one field here and one line
in the sampler (``tests/test_schema.py`` adds a throwaway field to check it).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Union

from constants import DEFAULTS, ServiceConstants

# Bounds that keep every row's arithmetic finite in float32 (logits are within +-1e3; a penalty
# is multiplied by a count of at most max_seq_len; 1 / MIN_TEMPERATURE stays far from 3e38).
# Past them one request's inf or NaN would reach the shared batch.
MAX_PENALTY = 1e4
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_INT = 2**63 - 1  # what an int64 tensor (seeds, indices) holds

# A bound: a number, or a function of the server's limits (max_tokens depends on max_seq_len).
Bound = Union[int, float, None, Callable[[ServiceConstants], Union[int, float]]]


@dataclass(frozen=True)
class Spec:
    """How one option is read from a request body."""

    kind: str  # "int", "float", "bool", or "custom" (parsed by the request module by name)
    lo: Bound = None
    hi: Bound = None
    alias: str | None = None  # the same setting under OpenAI's name
    row: str | None = None  # "float" / "long" / "bool": the sampler's (B,) tensor of it
    default_from: str | None = None  # a ServiceConstants field that gives the default

    def bounds(self, limits: ServiceConstants) -> tuple[Any, Any]:
        return tuple(b(limits) if callable(b) else b for b in (self.lo, self.hi))


def option(default, kind: str, *, lo: Bound = None, hi: Bound = None, alias: str | None = None,
           row: str | None = None, default_from: str | None = None):
    """A field of SamplingParams with its wire spec (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"spec": Spec(
        kind, lo, hi, alias, row, default_from)})


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options, built once from the body (the contract's defaults), as
    vLLM's SamplingParams."""

    max_tokens: int = option(DEFAULTS.default_max_tokens, "int", lo=0,
                             hi=lambda c: c.max_seq_len - 2,
                             default_from="default_max_tokens")
    # EOS and stops blocked before this many tokens (never more than max_tokens)
    min_tokens: int = option(0, "int", lo=0, row="long")
    stop: tuple[str, ...] = option((), "custom")  # stop sequences, none empty
    n: int = option(1, "int", lo=1, hi=lambda c: c.max_beam)  # completions per prompt
    # sampled per prompt; the n best by total log-prob are returned (default: n)
    best_of: int = option(1, "custom", lo=1, hi=lambda c: c.max_beam)
    # alternatives per token to return; None: absent (null)
    logprobs: int | None = option(None, "int", lo=0, hi=lambda c: c.max_logprobs)
    echo: bool = option(False, "bool")  # return the prompt's tokens and log-probs too
    seed: int | None = option(None, "int", lo=-MAX_INT, hi=2**64 - 1)
    temperature: float = option(1.0, "custom", lo=0.0, hi=MAX_TEMPERATURE,
                                row="float")  # 0 = greedy
    top_p: float = option(1.0, "float", lo=-MAX_PENALTY, hi=1.0,
                          row="float")  # <= 0 = greedy (ParlAI sends -1)
    # 0 = off (sampling's top-k, not logprobs'); -1 and values past the dictionary too
    top_k: int = option(0, "custom", lo=-1, hi=MAX_INT, row="long")
    lambda_decay: float = option(-1.0, "float", lo=-MAX_PENALTY, hi=1.0,
                                 row="float")  # <= 0 = factual nucleus off
    omega_bound: float = option(0.3, "float", lo=0.0, hi=1.0, row="float")
    alpha_presence: float = option(0.0, "float", lo=-MAX_PENALTY, hi=MAX_PENALTY,
                                   alias="presence_penalty", row="float")
    alpha_frequency: float = option(0.0, "float", lo=-MAX_PENALTY, hi=MAX_PENALTY,
                                    alias="frequency_penalty", row="float")
    alpha_presence_src: float = option(0.0, "float", lo=-MAX_PENALTY, hi=MAX_PENALTY,
                                       row="float")
    alpha_frequency_src: float = option(0.0, "float", lo=-MAX_PENALTY, hi=MAX_PENALTY,
                                        row="float")
    alpha_src_penalty_end_idx: int = option(-1, "int", lo=-MAX_INT,
                                            hi=MAX_INT)  # < 0 = the whole prompt
    # CTRL's penalty, as HF and vLLM take it: > 1 discourages every token already in the
    # prompt or the output (positive logits divided by it, negative ones multiplied); 1 = off.
    repetition_penalty: float = option(1.0, "float", lo=MIN_TEMPERATURE, hi=MAX_PENALTY,
                                       row="float")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p <= 0

    @property
    def num_logprobs(self) -> int:
        """How many alternatives to return per token (0: none)."""
        return self.logprobs or 0

    @functools.cached_property
    def stop_bytes(self) -> tuple[bytes, ...]:
        """UTF-8 of the stop sequences, duplicates dropped: stops match on bytes."""
        return tuple(dict.fromkeys(s.encode("utf-8") for s in self.stop if s))

    def seeded(self) -> "SamplingParams":
        """With a concrete seed, drawn once on rank 0 so every rank samples the same."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))


def specs(cls: type = SamplingParams) -> tuple[tuple[str, Spec, Any], ...]:
    """(name, spec, default) of every option of ``cls`` (SamplingParams or a subclass)."""
    return tuple((f.name, f.metadata["spec"], f.default) for f in dataclasses.fields(cls)
                 if "spec" in f.metadata)


def row_fields(cls: type = SamplingParams) -> tuple[tuple[str, str], ...]:
    """(name, tensor kind) of the options the sampler takes as (B,) tensors."""
    return tuple((name, spec.row) for name, spec, _ in specs(cls) if spec.row)


def wire_names(cls: type = SamplingParams) -> frozenset[str]:
    """Every body field that sets an option of ``cls`` (aliases included)."""
    return frozenset(n for name, spec, _ in specs(cls) for n in (name, spec.alias) if n)


ROW_FIELDS = row_fields()
