"""Counting GPT-2 tokens for the agent's prompt-length limits.

BB3's per-module limits (1912, 1812, ...) are in GPT-2 BPE tokens, so the agent counts with the
server's own tokenizer (`opt_serving.tokenizer`, metaseq's `gpt2-vocab.json` /
`gpt2-merges.txt`): from `--tokenizer-dir`, else from the toolkit's assets folder that
`opt-assets fetch` fills. Without those files the agent falls back to an estimate from GPT-2's
pre-tokenisation, slightly generous so that prompts are cut a little early rather than too late
(the server would then drop their oldest tokens, and with them the start of the first line).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opt_serving.tokenizer import (MERGES_FILE, VOCAB_FILE, AssetError, AssetPaths,
                                   default_assets_dir)
from opt_serving.tokenizer import Tokenizer as BPETokenizer

TokenCounter = Callable[[str], int]
_CACHE = 16384  # every module of every turn measures the same history lines again

# GPT-2's pre-tokeniser, with \p{L} / \p{N} spelled in the stdlib `re` dialect.
_PRETOKEN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def count_pretokens(text: str) -> int:
    """A floor under the BPE count: GPT-2's BPE never merges across pre-tokens, and every
    pre-token is at least one token."""
    return len(_PRETOKEN.findall(text))


def estimate_tokens(text: str) -> int:
    """An upper-leaning estimate: one token per pre-token, plus one per 6 extra bytes."""
    total = 0
    for piece in _PRETOKEN.findall(text):
        core = piece.strip() or piece
        total += max(1, math.ceil(len(core.encode("utf-8")) / 6))
    return total


@dataclass(frozen=True)
class Tokenizer:
    """A token counter and where it came from (shown by --debug-bb3)."""

    count: TokenCounter
    source: str
    # A count that is never above the server's (None: `count` is exact). Token positions sent
    # to the server (alpha_src_penalty_end_idx) are measured with it, so that an estimate
    # never reaches past the point it marks.
    floor: TokenCounter | None = None


def estimate_tokenizer() -> Tokenizer:
    return Tokenizer(functools.lru_cache(maxsize=_CACHE)(estimate_tokens),
                     "estimate (no tokenizer files found; see `opt-assets fetch`)",
                     functools.lru_cache(maxsize=_CACHE)(count_pretokens))


def bpe_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The real BPE from a folder with metaseq's two files (refuses OpenAI's vocabulary)."""
    folder = Path(directory)
    paths = AssetPaths(folder / VOCAB_FILE, folder / MERGES_FILE)
    for path in (paths.vocab, paths.merges):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (the tokenizer folder needs "
                                    f"{VOCAB_FILE} and {MERGES_FILE})")
    bpe = BPETokenizer(paths)
    count = functools.lru_cache(maxsize=_CACHE)(lambda text: len(bpe.encode(text)))
    return Tokenizer(count, str(folder))


def load_tokenizer(directory: str | os.PathLike | None = None) -> Tokenizer:
    """The BPE from `directory` when given (errors are loud), else from the toolkit's assets
    folder when it has the files, else the estimate."""
    if directory:
        return bpe_tokenizer(directory)
    try:
        return bpe_tokenizer(default_assets_dir())
    except (FileNotFoundError, AssetError):
        return estimate_tokenizer()
