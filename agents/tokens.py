"""GPT-2 tokens for the agent: prompt-length limits and the token positions it sends.

BB3's per-module limits (1912, 1812, ...) and ``alpha_src_penalty_end_idx`` are in GPT-2 BPE
tokens, so the agent tokenizes as the server does (metaseq's `gpt2-vocab.json` /
`gpt2-merges.txt`), in this order of preference:

1. the files in `--tokenizer-dir`, else in the toolkit's assets folder (`opt-assets fetch`);
2. the completions server's own tokenizer through `POST /tokenize` (opt-serve has it, as vLLM
   and TGI do), each text asked once and cached;
3. an estimate from GPT-2's pre-tokenisation, slightly generous so that prompts are cut a
   little early rather than too late (the server would then drop their oldest tokens).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agents.client import RetryPolicy, ServiceError, make_session, normalise_url, request_json
from opt_serving.tokenizer import (MERGES_FILE, VOCAB_FILE, AssetError, AssetPaths,
                                   default_assets_dir)
from opt_serving.tokenizer import Tokenizer as BPETokenizer

TokenCounter = Callable[[str], int]
Encoder = Callable[[str], "tuple[int, ...] | None"]  # None: could not be tokenized now
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
class TokenMeasure:
    """How the agent measures text in the server's tokens: counts, positions, and where the
    measure comes from (shown by --debug-bb3). Not a tokenizer: it never decodes."""

    count: TokenCounter
    source: str
    # A count that is never above the server's (None: `count` is exact). Token positions sent
    # to the server (alpha_src_penalty_end_idx) are measured with it, so that an estimate
    # never reaches past the point it marks.
    floor: TokenCounter | None = None
    # The server's token ids of a text (None for the estimate): positions ParlAI finds by
    # searching token ids are found the same way.
    encode: Encoder | None = None


def estimate_tokenizer() -> TokenMeasure:
    return TokenMeasure(functools.lru_cache(maxsize=_CACHE)(estimate_tokens),
                     "estimate (no tokenizer files found; see `opt-assets fetch`)",
                     functools.lru_cache(maxsize=_CACHE)(count_pretokens))


def bpe_tokenizer(directory: str | os.PathLike) -> TokenMeasure:
    """The real BPE from a folder with metaseq's two files (refuses OpenAI's vocabulary)."""
    folder = Path(directory)
    paths = AssetPaths(folder / VOCAB_FILE, folder / MERGES_FILE)
    for path in (paths.vocab, paths.merges):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (the tokenizer folder needs "
                                    f"{VOCAB_FILE} and {MERGES_FILE})")
    bpe = BPETokenizer(paths)
    return _from_encoder(lambda text: tuple(bpe.encode(text)), str(folder))


def _from_encoder(encode: Encoder, source: str) -> TokenMeasure:
    """Counts and positions from ``encode`` (cached); a text it cannot tokenize now (None)
    is counted by the estimate."""
    encode = functools.lru_cache(maxsize=_CACHE)(encode)

    def count(text: str) -> int:
        ids = encode(text)
        return estimate_tokens(text) if ids is None else len(ids)
    return TokenMeasure(functools.lru_cache(maxsize=_CACHE)(count), source, encode=encode)


def server_tokenizer(server: str, timeout_s: float = 10.0,
                     api_key: str | None = None) -> TokenMeasure:
    """The completions server's tokenizer through ``POST {server}/tokenize``. Raises
    ServiceError when the server does not have the route (metaseq's own server) or is down;
    later failures fall back to the estimate for the text concerned."""
    url = normalise_url(server).removesuffix("/completions") + "/tokenize"
    session, policy = make_session(4), RetryPolicy(timeout_s=timeout_s, max_retries=0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def ask(text: str) -> tuple[int, ...]:
        body = request_json(session, "POST", url, policy, json={"prompt": text},
                            headers=headers)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServiceError(f"{url} answered without a list of token ids", url=url)
        return tuple(tokens)

    ask("Hello")  # does it answer at all?

    def encode(text: str) -> tuple[int, ...] | None:
        try:
            return ask(text)
        except ServiceError:
            return None
    return _from_encoder(encode, f"the server's tokenizer ({url})")


def load_tokenizer(directory: str | os.PathLike | None = None, server: str | None = None,
                   api_key: str | None = None) -> TokenMeasure:
    """The BPE from `directory` when given (errors are loud), else from the toolkit's assets
    folder when it has the files, else the server's /tokenize, else the estimate."""
    if directory:
        return bpe_tokenizer(directory)
    try:
        return bpe_tokenizer(default_assets_dir())
    except (FileNotFoundError, AssetError):
        pass
    if server:
        try:
            return server_tokenizer(server, api_key=api_key)
        except (ServiceError, ValueError):
            pass
    return estimate_tokenizer()
