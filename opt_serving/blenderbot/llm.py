"""``LLM(PATH)`` for BlenderBot 1: offline replies from Python with ParlAI's options.

    from opt_serving import LLM

    llm = LLM("zoo:blender/blender_400Mdistill/model", datapath="/data/parlai")
    (reply,) = llm.generate("your persona: i like hiking.\\nhi! how are you?")
    reply.text, reply.token_ids, reply.nbest[0].rescored

``generate`` takes texts (one message each, made into ParlAI's history vector with the
model's ``delimiter``, global end token and ``text_truncate``) or token-id lists (the whole
encoder input), and the generation options under ParlAI's names; the defaults are the model
file's ``.opt``, else the gen/blenderbot recipe. Requests run through the batching engine
(``engine.BeamEngine``) together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from opt_serving.config import DTYPES
from opt_serving.protocol import RequestError
from opt_serving.protocol.seq2seq import (SEARCH_FIELDS, Finished, check_option,
                                           unknown_name)

from . import files
from .engine import BeamEngine
from .model import BlenderbotModel
from .search import Hypothesis, SearchOptions


@dataclass(frozen=True)
class Candidate:
    """One finished reply of the n-best list."""

    text: str
    token_ids: tuple[int, ...]  # the end token excluded
    score: float  # summed log-prob
    rescored: float  # score / ((len + 2) / 6) ** beam_length_penalty: what ranks them


@dataclass(frozen=True)
class Reply:
    """The chosen reply (the n-best list's first) and the whole list, best first."""

    text: str
    token_ids: tuple[int, ...]
    prompt_index: int
    nbest: tuple[Candidate, ...]


def search_options(defaults: SearchOptions, options: dict) -> SearchOptions:
    """``defaults`` with ``options`` (ParlAI names) applied; TypeError for an unknown name
    (naming the nearest), ValueError naming the option for a bad value. The checks are the
    HTTP body's (``protocol.seq2seq.check_option``)."""
    unknown = sorted(set(options) - set(SEARCH_FIELDS))
    if unknown:
        raise TypeError(unknown_name(unknown[0], tuple(SEARCH_FIELDS), "option"))
    for name, value in options.items():
        try:
            check_option(name, value)
        except RequestError as e:
            raise ValueError(e.message) from None
    return dataclasses.replace(defaults, **options)  # SearchOptions checks the rest


class Codec:
    """Text in and out for one model: a prompt or a conversation to the encoder's input
    (ParlAI's history vector), ids to text (ParlAI's vec2txt), n-best lists to ``Finished``."""

    def __init__(self, loaded: files.Loaded, context: int):
        self.tokenizer, self.history, self.defaults = (loaded.tokenizer, loaded.history,
                                                       loaded.search)
        self.context = context  # encoder tokens at most

    def history_vector(self, turns: Sequence[str]) -> list[int]:
        """ParlAI's encoder input for a conversation (persona lines first, then the turns)."""
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer files (vocab.json, "
                             "merges.txt): send token ids")
        return self.history.vector(self.tokenizer, turns)

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.history_vector([prompt])
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError("a prompt is a string (one message) or a list of token ids (the "
                        f"whole encoder input); got {type(prompt).__name__}")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def finished(self, hyps: Sequence[Hypothesis]) -> list[Finished]:
        return [Finished(self.decode(h.tokens), h.tokens, h.score, h.rescored, h.ended)
                for h in hyps]


class BlenderbotLLM:
    """A BlenderBot 1 model and its batching engine. ``opt``: ParlAI options replacing the
    file's (as ParlAI's command line: ``delimiter``, ``text_truncate``, ``beam_size``...);
    ``max_batch``: requests decoded together; ``device`` / ``dtype`` as opt-serve's."""

    def __init__(self, path: str, *, device: str | None = None, dtype: str | None = None,
                 datapath: str | None = None, opt: dict | None = None, max_batch: int = 32,
                 max_beams: int | None = None):
        loaded = files.load(path, datapath=datapath, overrides=opt)
        self.model, self.name = to_device(loaded.model, device, dtype), loaded.name
        self.engine = build_engine(self.model, loaded, max_batch, max_beams)
        self.codec = Codec(loaded, self.engine.context)
        self.defaults = loaded.search  # the model's .opt, else the recipe

    def history_vector(self, turns: Sequence[str]) -> list[int]:
        """ParlAI's encoder input for a conversation (``Codec.history_vector``)."""
        return self.codec.history_vector(turns)

    def generate(self, prompts, **options) -> list[Reply]:
        """One reply per prompt, in order, with its n-best list."""
        search = search_options(self.defaults, options)
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        contexts = [self.codec.encode(p) for p in ([prompts] if single else list(prompts))]
        try:
            results = self.engine.run(contexts, search)  # checks them all before any step
        except RequestError as e:
            raise ValueError(e.message) from None
        return [self.reply(i, hyps) for i, hyps in enumerate(results)]

    def reply(self, index: int, hyps: Sequence[Hypothesis]) -> Reply:
        nbest = tuple(Candidate(f.text, f.token_ids, f.score, f.rescored)
                      for f in self.codec.finished(hyps))
        return Reply(nbest[0].text, nbest[0].token_ids, index, nbest)

    def close(self) -> None:
        pass  # one process, nothing to stop: here for LLM's interface

    def __enter__(self) -> "BlenderbotLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_device(model: BlenderbotModel, device: str | None, dtype: str | None):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev)
    if dtype:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model = model.to(DTYPES[dtype])
    return model


def build_engine(model: BlenderbotModel, loaded: files.Loaded, max_batch: int,
                 max_beams: int | None) -> BeamEngine:
    """The engine for ``model``: ``max_batch`` group slots of ``max_beams`` rows (default: 10,
    or the model's own beam size when larger), the model's positions as the reply limit and
    the history's truncation as the context."""
    cfg = model.cfg
    return BeamEngine(model, max_groups=max_batch,
                      max_beams=max_beams or max(10, loaded.search.width),
                      max_tokens=cfg.max_positions,
                      context=min(loaded.history.truncate or cfg.max_positions,
                                  cfg.max_positions))
