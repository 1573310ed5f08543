"""ParlAI's TreeSearch (``gen/blenderbot``: beam 10, min length 20, 3-gram blocking on the
reply and on the context, length penalty 0.65, 128 tokens), reproduced rule for rule:

- log-softmax in fp32; blocked tokens get -1e20 (ParlAI's ``neginf``), not -inf;
- step 0 expands beam 0 only (every beam starts as ``[__start__]``);
- the end token is blocked while fewer than ``beam_min_length`` tokens exist, so the earliest
  end is token ``beam_min_length + 1``; greedy ignores the minimum;
- n-grams are blocked on each hypothesis with ``__start__`` included, and on the context
  (the truncated encoder input);
- beams are chosen by top-k over beams x vocabulary; a hypothesis that ends keeps its place
  for that step, joins the finished list, and its score drops to -1e20 so it is not extended;
- the search stops once an end has been the top candidate and at least k hypotheses have
  finished, else after ``max_tokens`` steps (the end counts); if nothing finished by then,
  beam 0's last token becomes the end (a reply of ``max_tokens - 1`` tokens);
- finished hypotheses are rescored ``score / ((L + 2) / 6) ** length_penalty`` with L the
  reply's tokens including the end, best first.

``search`` takes the model as a function from decoder prefixes to next-token logits, so the
rules are tested on hand-built logits and the engine can drive the same state step by step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import END_ID, NEAR_INF, START_ID


@dataclass(frozen=True)
class SearchOptions:
    """ParlAI's option names; the defaults are the gen/blenderbot recipe."""

    inference: str = "beam"  # "beam" or "greedy"
    beam_size: int = 10
    beam_min_length: int = 20
    beam_block_ngram: int = 3
    beam_context_block_ngram: int = 3
    beam_length_penalty: float = 0.65
    max_tokens: int = 128

    def __post_init__(self):
        if self.inference not in ("beam", "greedy"):
            raise ValueError(f"inference must be beam or greedy, got {self.inference!r}")
        if self.beam_size < 1 or self.max_tokens < 1:
            raise ValueError("beam_size and max_tokens must be at least 1")

    @property
    def width(self) -> int:
        return 1 if self.inference == "greedy" else self.beam_size

    @property
    def min_length(self) -> int:
        return 0 if self.inference == "greedy" else self.beam_min_length


@dataclass(frozen=True)
class Hypothesis:
    """One finished reply: its tokens (the end excluded), its summed log-prob and the score
    it was ranked by."""

    tokens: tuple[int, ...]
    score: float
    rescored: float
    ended: bool = True  # False: cut at max_tokens (its last token replaced by the end)


@dataclass
class BeamState:
    """A search in progress (ParlAI's ``TreeSearch`` for one request)."""

    options: SearchOptions
    context: tuple[int, ...]
    hyps: list[list[int]] = field(default_factory=list)  # each from __start__
    scores: torch.Tensor | None = None  # (k,) summed log-probs; None before step 0
    finished: list[tuple[list[int], float]] = field(default_factory=list)  # (tokens, score)
    eos_top: bool = False
    steps: int = 0
    beams: list[int] = field(default_factory=list)  # the last step's source beam per row

    def __post_init__(self):
        self.hyps = [[START_ID] for _ in range(self.options.width)]

    @property
    def done(self) -> bool:
        return (self.eos_top and len(self.finished) >= self.options.width) or \
            self.steps >= self.options.max_tokens

    @functools.cached_property
    def _context_ngrams(self) -> dict[tuple[int, ...], list[int]]:
        """The context's n-grams (n = beam_context_block_ngram) as prefix -> next tokens,
        built once: the context does not change during the search."""
        return ngram_index(self.context, self.options.beam_context_block_ngram)

    def prefixes(self) -> list[list[int]]:
        """The decoder inputs whose next-token logits the next ``advance`` wants."""
        return self.hyps[:1] if self.scores is None else self.hyps

    def advance(self, logits: torch.Tensor) -> None:
        """One step from next-token logits (rows of ``prefixes()``, (n, V))."""
        opts, k = self.options, self.options.width
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.scores is None:  # step 0: only beam 0 expands
            logprobs = logprobs[:1]
            prior = torch.zeros(1)
        else:
            prior = self.scores
        if self.steps < opts.min_length:  # log_softmax's output is ours to edit
            logprobs[:, END_ID] = -NEAR_INF
        block(logprobs, self.hyps, opts.beam_block_ngram, None)
        block(logprobs, self.hyps, opts.beam_context_block_ngram, self.context,
              self._context_ngrams)
        if k == 1:  # greedy: each hypothesis keeps its own best token
            best, tokens = logprobs.max(dim=-1)
            scores, beams = best + prior, torch.arange(logprobs.shape[0])
        else:
            flat = (logprobs + prior[:, None]).view(-1)
            scores, idx = torch.topk(flat, k)
            beams, tokens = idx // logprobs.shape[-1], idx % logprobs.shape[-1]
        beams, tokens = beams.tolist(), tokens.tolist()
        self.beams = beams  # a cached decoder reorders its rows' histories by these
        self.hyps = [self.hyps[b] + [t] for b, t in zip(beams, tokens)]
        self.scores = scores.clone()
        self.steps += 1
        for i, t in enumerate(tokens):
            if t == END_ID and float(scores[i]) > -NEAR_INF:
                self.finished.append((self.hyps[i], float(scores[i])))
                self.scores[i] = -NEAR_INF  # not extended
        if tokens[0] == END_ID:
            self.eos_top = True

    def results(self) -> list[Hypothesis]:
        """The n-best list, best first (rescored by length)."""
        finished, ended = list(self.finished), True
        if not finished:  # forced end: beam 0's last token becomes the end
            finished = [(self.hyps[0][:-1] + [END_ID], float(self.scores[0]))]
            ended = False
        lp = self.options.beam_length_penalty
        out = []
        for hyp, score in finished:
            length = len(hyp) - 1  # the reply's tokens, the end included
            rescored = score / ((length + 2) / 6) ** lp
            out.append(Hypothesis(tuple(hyp[1:-1]), score, rescored, ended))
        return sorted(out, key=lambda h: -h.rescored)


def ngram_index(tokens: Sequence[int], n: int) -> dict[tuple[int, ...], list[int]]:
    """Every n-gram of ``tokens`` as its first n - 1 tokens -> the tokens that follow them."""
    index: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(tokens) - n + 1 if n > 0 else 0):
        index.setdefault(tuple(tokens[i:i + n - 1]), []).append(tokens[i + n - 1])
    return index


def block(logprobs: torch.Tensor, hyps: Sequence[Sequence[int]], n: int,
          source: Sequence[int] | None,
          source_index: dict[tuple[int, ...], list[int]] | None = None) -> None:
    """-1e20 at every token that would complete an n-gram already in the hypothesis (or in
    ``source``, whose ``ngram_index`` may be given), in place: ParlAI's ``_block_ngrams``,
    the blocked places written at once.  logprobs (rows, V)"""
    if n <= 0:
        return
    if source is not None and source_index is None:
        source_index = ngram_index(source, n)
    rows, tokens = [], []
    for row, hyp in enumerate(hyps[:logprobs.shape[0]]):
        if len(hyp) < n - 1:
            continue
        prefix = tuple(hyp[len(hyp) - (n - 1):]) if n > 1 else ()
        found = source_index.get(prefix, ()) if source is not None else \
            ngram_index(hyp, n).get(prefix, ())
        rows += [row] * len(found)
        tokens += found
    if rows:
        logprobs[torch.tensor(rows), torch.tensor(tokens)] = -NEAR_INF


def search(step: Callable[[list[list[int]]], torch.Tensor], context: Sequence[int],
           options: SearchOptions = SearchOptions()) -> list[Hypothesis]:
    """Run a search to the end; ``step(prefixes)`` gives next-token logits (n, V)."""
    state = BeamState(options, tuple(context))
    while not state.done:
        state.advance(step(state.prefixes()))
    return state.results()
