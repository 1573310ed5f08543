"""The completions request, torch-free: the decoding options, the field names, parsing a body
once into a typed, validated ``CompletionRequest`` (every bad input is a ``RequestError``
naming the field: a 400, or 413 for size), and building a body as a client sends it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from constants import DEFAULTS, ServiceConstants
from opt_serving.vocab import DICT_SIZE

Prompt = Union[str, tuple[int, ...]]  # text, or token ids

# OpenAI fields we accept but cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("suffix", "logit_bias")
KNOWN = frozenset({
    "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "n", "best_of",
    "logprobs", "echo", "stop", "seed", "lambda_decay", "omega_bound", "alpha_presence",
    "alpha_frequency", "alpha_presence_src", "alpha_frequency_src", "alpha_src_penalty_end_idx",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "stream", "model", "user", *UNSUPPORTED})


def _row(kind: str, **kw):
    """A field the sampler needs as a (B,) tensor per batch ("float", "long" or "bool")."""
    return dataclasses.field(metadata={"row": kind}, **kw)


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options, built once from the body (the contract's defaults), as
    vLLM's SamplingParams. Fields marked ``_row`` become the sampler's per-row tensors
    (``decoding.sampling.RowParams``): a new knob is a field here and a line in the sampler."""

    max_tokens: int = DEFAULTS.default_max_tokens
    min_tokens: int = _row("long", default=0)  # EOS and stops blocked before this many tokens
    stop: tuple[str, ...] = ()  # stop sequences, none empty
    n: int = 1  # completions returned per prompt
    best_of: int = 1  # sampled per prompt; the n best by total log-prob are returned
    logprobs: int | None = None  # alternatives per token to return; None: absent (null)
    echo: bool = False  # return the prompt's tokens and teacher-forced log-probs too
    seed: int | None = None
    temperature: float = _row("float", default=1.0)  # 0 = greedy
    top_p: float = _row("float", default=1.0)  # <= 0 = greedy (ParlAI sends -1)
    top_k: int = _row("long", default=0)  # 0 = off (sampling's top-k, not logprobs')
    lambda_decay: float = _row("float", default=-1.0)  # <= 0 = factual nucleus off
    omega_bound: float = _row("float", default=0.3)
    alpha_presence: float = _row("float", default=0.0)
    alpha_frequency: float = _row("float", default=0.0)
    alpha_presence_src: float = _row("float", default=0.0)
    alpha_frequency_src: float = _row("float", default=0.0)
    alpha_src_penalty_end_idx: int = -1  # < 0 = the whole prompt
    # CTRL's penalty, as HF and vLLM take it: > 1 discourages every token already in the
    # prompt or the output (positive logits divided by it, negative ones multiplied); 1 = off.
    repetition_penalty: float = _row("float", default=1.0)

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


ROW_FIELDS = tuple((f.name, f.metadata["row"]) for f in dataclasses.fields(SamplingParams)
                   if "row" in f.metadata)


def completion_body(prompt: Prompt | Sequence[Prompt], **fields) -> dict:
    """A completions request body, fields in the order given (ParlAI's order, for clients that
    must send the same bytes); a name the protocol does not know is a ValueError."""
    unknown = sorted(set(fields) - KNOWN)
    if unknown:
        raise ValueError(f"not completions fields: {', '.join(unknown)}")
    return {"prompt": prompt, **fields}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class RequestError(ValueError):
    """A bad request: HTTP 400 (or ``status``) with ``body()``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request: its prompts, its decoding options and how to answer. Sequences:
    each prompt times ``best_of``; copy i of prompt p samples with
    ``make_generator(seed, p * best_of + i)`` once rank 0 has ``seeded()`` the options."""

    prompts: tuple[Prompt, ...]
    sampling: SamplingParams
    stream: bool = False
    model: str | None = None
    user: str | None = None
    ignored: tuple[str, ...] = ()  # unknown fields, for the log


# -- field readers ---------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(obj: Mapping, name: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestError(f"{name} must be an integer, got {json.dumps(v)[:80]}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise RequestError(f"{name} must be {bounds}, got {v}", name)
    return v


def _float(obj: Mapping, name: str, default: float, lo: float | None = None,
           hi: float | None = None) -> float:
    v = obj.get(name)
    if v is None:
        return default
    try:
        finite = _is_number(v) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise RequestError(f"{name} must be a finite number, got {json.dumps(v)[:40]}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                  else f"at least {lo}" if lo is not None else f"at most {hi}")
        raise RequestError(f"{name} must be {bounds}, got {v}", name)
    return float(v)


def _bool(obj: Mapping, name: str) -> bool:
    v = obj.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(v)[:80]}", name)
    return v


def _str(obj: Mapping, name: str) -> str | None:
    v = obj.get(name)
    if v is not None and not isinstance(v, str):
        raise RequestError(f"{name} must be a string, got {json.dumps(v)[:80]}", name)
    return v


def _text(v: str, where: str, param: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{where} holds a lone UTF-16 surrogate at character {e.start}: "
                           "send valid Unicode text", param) from None
    return v


def _ids(v: list, where: str) -> tuple[int, ...]:
    for i, t in enumerate(v):
        if not isinstance(t, int) or isinstance(t, bool):
            raise RequestError(f"{where}[{i}] must be a token id (an integer), got "
                               f"{json.dumps(t)}", "prompt")
        if not 0 <= t < DICT_SIZE:
            raise RequestError(f"{where}[{i}] = {t} is not in the dictionary "
                               f"(0..{DICT_SIZE - 1})", "prompt")
    return tuple(v)


def _prompts(obj: Mapping) -> tuple[Prompt, ...]:
    """str, list[str], list[int] or list[list[int]]; nothing empty."""
    v = obj.get("prompt")
    if v is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(v, str):
        v = [v]
    elif not isinstance(v, list) or not v:
        raise RequestError("prompt must be a non-empty string, a list of strings, a list of "
                           "token ids or a list of lists of token ids", "prompt")
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        v = [v]
    prompts: list[Prompt] = []
    for i, p in enumerate(v):
        where = f"prompt[{i}]" if len(v) > 1 else "prompt"
        if isinstance(p, str):
            prompts.append(_text(p, where, "prompt"))
        elif isinstance(p, list):
            prompts.append(_ids(p, where))
        else:
            raise RequestError(f"{where} must be a string or a list of token ids, got "
                               f"{json.dumps(p)[:80]}", "prompt")
        if not prompts[-1]:
            raise RequestError(f"{where} is empty", "prompt")
    if len({type(p) for p in prompts}) > 1:
        raise RequestError("prompt mixes strings and token ids", "prompt")
    return tuple(prompts)


def _stop(obj: Mapping, limits: ServiceConstants) -> tuple[str, ...]:
    v = obj.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings",
                           "stop")
    if len(stops) > limits.max_stop_sequences:
        raise RequestError(f"stop has {len(stops)} sequences; at most "
                           f"{limits.max_stop_sequences} are allowed", "stop")
    return tuple(_text(s, "stop", "stop") for s in stops)


# Bounds that keep every row's arithmetic finite in float32 (logits are within +-1e3; a penalty
# is multiplied by a count of at most max_seq_len; 1 / MIN_TEMPERATURE stays far from 3e38).
# Past them one request's inf or NaN would reach the shared batch.
MAX_PENALTY = 1e4
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_INT = 2**63 - 1  # what an int64 tensor (seeds, indices) holds


def _penalty(obj: Mapping, ours: str, openai: str) -> float:
    """metaseq's alpha_* or OpenAI's *_penalty: the same formula under two names."""
    if obj.get(ours) is not None and obj.get(openai) is not None and obj[ours] != obj[openai]:
        raise RequestError(f"{ours} and {openai} are the same setting; give one", openai)
    name = ours if obj.get(ours) is not None else openai
    return _float(obj, name, 0.0, -MAX_PENALTY, MAX_PENALTY)


def _top_k(obj: Mapping) -> int:
    """0 = off; -1 (off, as OpenAI-style clients send) and values past the dictionary too."""
    k = _int(obj, "top_k", 0, -1, MAX_INT)
    return k if 0 < k <= DICT_SIZE else 0


def _temperature(obj: Mapping) -> float:
    t = _float(obj, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    if 0 < t < MIN_TEMPERATURE:
        raise RequestError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                           f"{t}: smaller ones overflow the scaled logits", "temperature")
    return t


# -- parsing -----------------------------------------------------------------------------------

def parse_request(obj: Any, limits: ServiceConstants = DEFAULTS) -> CompletionRequest:
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if obj.get(name):
            raise RequestError(f"{name} is not supported by this server", name)
    prompts = _prompts(obj)
    max_tokens = _int(obj, "max_tokens", limits.default_max_tokens, 0, limits.max_seq_len - 2)
    n = _int(obj, "n", 1, 1, limits.max_beam)
    best_of = _int(obj, "best_of", n, 1, limits.max_beam)
    if best_of < n:
        raise RequestError(f"best_of ({best_of}) must be at least n ({n})", "best_of")
    if len(prompts) * best_of > limits.max_sequences:
        raise RequestError(f"{len(prompts)} prompts x best_of {best_of} is more than "
                           f"{limits.max_sequences} sequences", "prompt")
    stream = _bool(obj, "stream")
    if stream and best_of > n:
        raise RequestError("best_of > n cannot be streamed: the best are known at the end",
                           "best_of")
    sampling = SamplingParams(
        max_tokens=max_tokens, n=n, best_of=best_of,
        # ParlAI may ask min_tokens 1 with max_tokens 0 (scoring): max_tokens wins.
        min_tokens=min(_int(obj, "min_tokens", 0, 0), max_tokens),
        stop=_stop(obj, limits),
        logprobs=_int(obj, "logprobs", None, 0, limits.max_logprobs), echo=_bool(obj, "echo"),
        seed=_int(obj, "seed", None, -MAX_INT, 2**64 - 1),
        temperature=_temperature(obj),
        top_p=_float(obj, "top_p", 1.0, -MAX_PENALTY, 1.0),
        # top_k past the dictionary keeps every token, as top_k 0 does.
        top_k=_top_k(obj),
        lambda_decay=_float(obj, "lambda_decay", -1.0, -MAX_PENALTY, 1.0),
        omega_bound=_float(obj, "omega_bound", 0.3, 0.0, 1.0),
        alpha_presence=_penalty(obj, "alpha_presence", "presence_penalty"),
        alpha_frequency=_penalty(obj, "alpha_frequency", "frequency_penalty"),
        alpha_presence_src=_float(obj, "alpha_presence_src", 0.0, -MAX_PENALTY, MAX_PENALTY),
        alpha_frequency_src=_float(obj, "alpha_frequency_src", 0.0, -MAX_PENALTY, MAX_PENALTY),
        alpha_src_penalty_end_idx=_int(obj, "alpha_src_penalty_end_idx", -1, -MAX_INT, MAX_INT),
        repetition_penalty=_float(obj, "repetition_penalty", 1.0, MIN_TEMPERATURE, MAX_PENALTY))
    return CompletionRequest(
        prompts=prompts, sampling=sampling, stream=stream, model=_str(obj, "model"),
        user=_str(obj, "user"), ignored=tuple(sorted(k for k in obj if k not in KNOWN)))


def _no_constant(name: str):
    raise RequestError(f"the request body is not valid JSON: {name} is not a number")


def parse_body(raw: bytes, limits: ServiceConstants = DEFAULTS) -> CompletionRequest:
    """From the raw HTTP body: size, UTF-8 and JSON are checked here too."""
    return parse_request(load_body(raw, limits), limits)


def load_body(raw: bytes, limits: ServiceConstants = DEFAULTS) -> Any:
    """The JSON value of a raw body; every way it can be unreadable is a RequestError."""
    if len(raw) > limits.max_body_bytes:
        raise RequestError(f"the request body is {len(raw)} bytes; the limit is "
                           f"{limits.max_body_bytes}", code="body_too_large", status=413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError as e:  # e.g. an integer past Python's 4300-digit conversion limit
        raise RequestError(f"the request body cannot be read: {e}") from None


def parse_tokenize(obj: Any) -> tuple[str, ...] | str:
    """``POST /tokenize``: {"prompt": str or [str, ...]} (vLLM's route, a list allowed too)."""
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    v = obj.get("prompt")
    if isinstance(v, str):
        return _text(v, "prompt", "prompt")
    if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        return tuple(_text(p, f"prompt[{i}]", "prompt") for i, p in enumerate(v))
    raise RequestError("prompt must be a string or a non-empty list of strings", "prompt")
