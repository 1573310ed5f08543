"""The completions request, torch-free: parsing a body once into a typed, validated
``CompletionRequest`` (every bad input is a ``RequestError`` naming the field: a 400, or 413 for
size), and building a body as a client sends it. The options themselves, and the table that
drives their parsing, are ``options.SamplingParams``.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from constants import DEFAULTS, ServiceConstants
from opt_serving.vocab import DICT_SIZE

from .options import MIN_TEMPERATURE, SamplingParams, Spec, specs, wire_names

Prompt = Union[str, Sequence[int]]  # text, or token ids (parsed: a tuple)

# OpenAI fields we accept but cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("suffix", "logit_bias")
# Fields of the request that are not decoding options.
REQUEST_FIELDS = ("prompt", "stream", "stream_options", "model", "user")


def known_fields(cls: type = SamplingParams) -> frozenset[str]:
    """Every field a completions body may carry for options of type ``cls``."""
    return frozenset({*REQUEST_FIELDS, *wire_names(cls), *UNSUPPORTED})


KNOWN = known_fields()


def unknown_option_error(names: Sequence[str], cls: type = SamplingParams) -> str:
    """'not a completions option: max_tokenz (did you mean max_tokens?)' for Python callers,
    who pass decoding options only."""
    known = sorted(wire_names(cls))
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return (f"not a completions option: {', '.join(parts)}. The options are: "
            f"{', '.join(known)}")


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
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
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


def _penalty(obj: Mapping, name: str, spec: Spec, default: float,
             limits: ServiceConstants) -> float:
    """metaseq's alpha_* or OpenAI's *_penalty: the same setting under two names."""
    alias = spec.alias
    if obj.get(name) is not None and obj.get(alias) is not None and obj[name] != obj[alias]:
        raise RequestError(f"{name} and {alias} are the same setting; give one", alias)
    given = name if obj.get(name) is not None else alias
    return _float(obj, given, default, *spec.bounds(limits))


def _top_k(obj: Mapping, name: str, spec: Spec, default: int, limits: ServiceConstants) -> int:
    """0 = off; -1 (off, as OpenAI-style clients send) and values past the dictionary too."""
    k = _int(obj, name, default, *spec.bounds(limits))
    return k if 0 < k <= DICT_SIZE else 0


def _temperature(obj: Mapping, name: str, spec: Spec, default: float,
                 limits: ServiceConstants) -> float:
    t = _float(obj, name, default, *spec.bounds(limits))
    if 0 < t < MIN_TEMPERATURE:
        raise RequestError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                           f"{t}: smaller ones overflow the scaled logits", name)
    return t


def _stop_option(obj: Mapping, name: str, spec: Spec, default, limits: ServiceConstants):
    return _stop(obj, limits)


# Options whose reading is more than a bounded number: by field name.
_CUSTOM = {"stop": _stop_option, "temperature": _temperature, "top_k": _top_k}


def parse_options(obj: Mapping, limits: ServiceConstants = DEFAULTS,
                  cls: type = SamplingParams) -> SamplingParams:
    """The options of a request body, read field by field from ``cls``'s table."""
    values: dict[str, Any] = {}
    for name, spec, default in specs(cls):
        if spec.default_from is not None:
            default = getattr(limits, spec.default_from)
        if spec.alias is not None:
            values[name] = _penalty(obj, name, spec, default, limits)
        elif spec.kind == "int":
            values[name] = _int(obj, name, default, *spec.bounds(limits))
        elif spec.kind == "float":
            values[name] = _float(obj, name, default, *spec.bounds(limits))
        elif spec.kind == "bool":
            values[name] = _bool(obj, name)
        elif name == "best_of":  # its default is n, parsed before it
            values[name] = _int(obj, name, values["n"], *spec.bounds(limits))
        else:
            values[name] = _CUSTOM[name](obj, name, spec, default, limits)
    if values["best_of"] < values["n"]:
        raise RequestError(f"best_of ({values['best_of']}) must be at least n "
                           f"({values['n']})", "best_of")
    # ParlAI may ask min_tokens 1 with max_tokens 0 (scoring): max_tokens wins.
    values["min_tokens"] = min(values["min_tokens"], values["max_tokens"])
    return cls(**values)


# -- parsing -----------------------------------------------------------------------------------

def _stream_usage(obj: Mapping, stream: bool) -> bool:
    """OpenAI's ``stream_options: {"include_usage": true}``: a last chunk with the usage."""
    v = obj.get("stream_options")
    if v is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true",
                           "stream_options")
    if not isinstance(v, dict) or set(v) - {"include_usage"}:
        raise RequestError('stream_options must be an object like {"include_usage": true}',
                           "stream_options")
    return _bool(v, "include_usage")


def parse_request(obj: Any, limits: ServiceConstants = DEFAULTS,
                  cls: type = SamplingParams) -> CompletionRequest:
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if obj.get(name):
            raise RequestError(f"{name} is not supported by this server", name)
    prompts = _prompts(obj)
    sampling = parse_options(obj, limits, cls)
    if len(prompts) * sampling.best_of > limits.max_sequences:
        raise RequestError(f"{len(prompts)} prompts x best_of {sampling.best_of} is more than "
                           f"{limits.max_sequences} sequences", "prompt")
    stream = _bool(obj, "stream")
    if stream and sampling.best_of > sampling.n:
        raise RequestError("best_of > n cannot be streamed: the best are known at the end",
                           "best_of")
    known = known_fields(cls)
    return CompletionRequest(
        prompts=prompts, sampling=sampling, stream=stream,
        include_usage=_stream_usage(obj, stream), model=_str(obj, "model"),
        user=_str(obj, "user"), ignored=tuple(sorted(k for k in obj if k not in known)))


def _no_constant(name: str):
    raise RequestError(f"the request body is not valid JSON: {name} is not a number")


class HugeInt(int):
    """An integer literal too long to convert (Python refuses past 4300 digits): it stands in
    as 10**100 with its sign, past every bound, so the field's own check names the field and
    its range; it prints as 'a 5000-digit integer'."""

    digits: int

    def __new__(cls, literal: str):
        self = super().__new__(cls, -10**100 if literal.startswith("-") else 10**100)
        self.digits = len(literal.lstrip("-"))
        return self

    def __str__(self) -> str:
        return f"a {self.digits}-digit integer"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self)


def _parse_int(literal: str) -> int:
    return HugeInt(literal) if len(literal) > 100 else int(literal)


def parse_body(raw: bytes, limits: ServiceConstants = DEFAULTS,
               cls: type = SamplingParams) -> CompletionRequest:
    """From the raw HTTP body: size, UTF-8 and JSON are checked here too."""
    return parse_request(load_body(raw, limits), limits, cls)


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
        try:
            return json.loads(text, parse_constant=_no_constant)
        except ValueError as e:
            if isinstance(e, (json.JSONDecodeError, RequestError)) or \
                    "integer string" not in str(e):
                raise
        # Past Python's 4300-digit conversion limit: again, with such literals kept as
        # HugeInt (a hook on every integer only for these bodies: it is slower).
        return json.loads(text, parse_constant=_no_constant, parse_int=_parse_int)
    except RequestError:
        raise
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError:  # nothing of the interpreter's advice goes into an answer
        raise RequestError("the request body cannot be read as JSON numbers") from None


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
