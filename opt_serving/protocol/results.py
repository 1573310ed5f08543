"""What the engine hands back for one sequence, torch-free: a finished ``SeqResult`` and a
streamed ``Delta``. ``render`` turns them into answers; ``decoding.sequence`` makes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

TopK = Sequence[tuple[int, float]]  # (id, log-prob) pairs, best first


@dataclass(frozen=True)
class SeqResult:
    """One finished sequence: what ``protocol.build_choice`` needs."""

    prompt_index: int
    copy: int
    prompt: tuple[int, ...]  # model input, leading </s> first
    truncated: int
    generated: tuple[int, ...]  # the returned tokens (EOS and anything after a stop cut off)
    logprobs: tuple[float, ...]
    tops: tuple[TopK, ...] | None
    prompt_logprobs: tuple[float, ...]  # teacher-forced, one per prompt[1:] (echo only)
    prompt_tops: tuple[TopK, ...] | None
    finish_reason: str
    text_bytes: int

    @property
    def total_logprob(self) -> float:
        return sum(self.logprobs)


@dataclass(frozen=True)
class Delta:
    """New output of one streamed choice: bytes of its text and the tokens that ended in them
    as (id, log-prob, top alternatives or None)."""

    index: int
    text: bytes
    tokens: tuple[tuple[int, float, TopK | None], ...]
    finish_reason: str | None = None
