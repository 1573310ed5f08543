"""The BlenderBot 1 wire contract (``opt-serve --model-file``), torch-free: the bodies of
``POST /v1/completions``, ``/v1/chat/completions`` and ``/tokenize`` with ``messages``, and
the answers, with ParlAI's option names.

    {"prompt": "hi there", "beam_size": 10, "beam_min_length": 20}
    {"messages": [{"role": "system", "content": "i like hiking."},
                  {"role": "user", "content": "hi"}]}

A system message is the persona: each of its lines becomes ``your persona: ...`` and the
persona opens the first user message (joined by a newline), as ParlAI's blended_skill_talk world
sends it; user and assistant messages then alternate, each a turn of ParlAI's history.
Answers are OpenAI's shapes plus ``nbest``: every finished reply, best first, with its summed
log-prob (``score``) and the length-penalised score that ranks it (``rescored``).
"""

from __future__ import annotations

import difflib
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from .request import RequestError

# ParlAI's generation options, and their JSON kinds.
SEARCH_FIELDS = {"inference": str, "beam_size": int, "beam_min_length": int,
                 "beam_block_ngram": int, "beam_context_block_ngram": int,
                 "beam_length_penalty": float, "max_tokens": int}
COMMON = ("model", "user", "n", "stream")
MAX_PROMPTS = 64
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class BeamRequest:
    """A parsed body: the encoder inputs as texts (each one message) or token ids, or the
    conversation's turns (chat); the options the caller set (ParlAI names)."""

    prompts: tuple[str | tuple[int, ...], ...] = ()
    turns: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    model: str | None = None
    chat: bool = False


def persona_text(persona: Sequence[str]) -> str:
    """ParlAI's persona lines: ``your persona: <fact>`` each (lines already so prefixed are
    kept as they are; blank ones dropped)."""
    lines = [p.strip() for text in persona for p in text.split("\n") if p.strip()]
    return "\n".join(p if p.startswith("your persona:") else f"your persona: {p}"
                     for p in lines)


def unknown_name(name: str, allowed: Sequence[str], what: str = "field") -> str:
    """The message for a name that is not one of ``allowed``, with the nearest."""
    near = difflib.get_close_matches(name, allowed, n=1)
    return (f"unknown {what} {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
            + f" (BlenderBot takes {', '.join(allowed)})")


def _check_fields(obj: dict, allowed: Sequence[str]) -> None:
    for name in obj:
        if name not in allowed:
            raise RequestError(unknown_name(name, allowed), name)


def check_option(name: str, value: Any) -> None:
    """A generation option's value has its JSON kind and a sane size (RequestError naming
    it); what SearchOptions itself refuses (beam_size 0, inference "topk") it says."""
    kind = SEARCH_FIELDS[name]
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or isinstance(value, bool):
        what = {str: "a string", int: "an integer", float: "a number"}[kind]
        raise RequestError(f"{name} must be {what}, got {value!r}", name)
    if kind is int and not -1 <= value <= 1 << 20:
        raise RequestError(f"{name} must be between -1 and {1 << 20}, got {value}", name)
    if kind is float and not math.isfinite(value):
        raise RequestError(f"{name} must be finite", name)


def _options(obj: dict) -> tuple[tuple[str, Any], ...]:
    out = []
    for name in SEARCH_FIELDS:
        if name in obj:
            check_option(name, obj[name])
            out.append((name, obj[name]))
    if obj.get("stream"):
        raise RequestError("stream is not offered for BlenderBot: a beam search knows its "
                           "reply only at the end", "stream")
    if obj.get("n", 1) != 1:
        raise RequestError("n must be 1: the n-best list comes with every answer (nbest)", "n")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    return tuple(out)


def _prompt(v: Any, where: str) -> str | tuple[int, ...]:
    if isinstance(v, str):
        if not v.strip():
            raise RequestError(f"{where} is empty", "prompt")
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in v):
        return tuple(v)
    raise RequestError(f"{where} must be a string or a non-empty list of token ids", "prompt")


def parse_completion(obj: Any) -> BeamRequest:
    """``POST /v1/completions``: a prompt (text: one message; ids: the whole encoder input)
    or a list of them."""
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(obj, ("prompt", *SEARCH_FIELDS, *COMMON))
    v = obj.get("prompt")
    if v is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        if len(v) > MAX_PROMPTS:
            raise RequestError(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        prompts = tuple(_prompt(p, f"prompt[{i}]") for i, p in enumerate(v))
    else:
        prompts = (_prompt(v, "prompt"),)
    return BeamRequest(prompts=prompts, options=_options(obj), model=obj.get("model"))


def chat_turns(messages: Any) -> tuple[str, ...]:
    """ParlAI's history turns of an OpenAI ``messages`` list (see the module's docstring)."""
    if not isinstance(messages, list) or not messages or len(messages) > 1000:
        raise RequestError("messages must be a non-empty list (at most 1000)", "messages")
    persona, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str) or set(m) - {"role", "content", "name"}:
            raise RequestError(f"messages[{i}] must be {{\"role\": system|user|assistant, "
                               "\"content\": text}", "messages")
        role = m["role"]
        if role == "system":
            if turns:
                raise RequestError(f"messages[{i}]: a system message (the persona) comes "
                                   "before the conversation", "messages")
            persona.append(m["content"])
            continue
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise RequestError(f"messages[{i}] is {role}'s, but {want}'s turn was expected: "
                               "user and assistant alternate, user first", "messages")
        turns.append(m["content"])
    if len(turns) % 2 == 0:
        raise RequestError("the last message must be the user's", "messages")
    opening = persona_text(persona)
    if opening:
        turns[0] = f"{opening}\n{turns[0]}"
    return tuple(turns)


def parse_chat(obj: Any) -> BeamRequest:
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(obj, ("messages", *SEARCH_FIELDS, *COMMON))
    return BeamRequest(turns=chat_turns(obj.get("messages")), options=_options(obj),
                       model=obj.get("model"), chat=True)


def parse_tokenize(obj: Any) -> BeamRequest:
    """``POST /tokenize``: {"prompt": text} or {"messages": [...]} (vLLM's route)."""
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(obj, ("prompt", "messages", "model"))
    if "messages" in obj:
        return BeamRequest(turns=chat_turns(obj["messages"]), chat=True)
    return BeamRequest(prompts=(_prompt(obj.get("prompt"), "prompt"),))


@dataclass(frozen=True)
class Finished:
    """One reply of the n-best list, decoded."""

    text: str
    token_ids: tuple[int, ...]
    score: float
    rescored: float
    ended: bool  # False: cut at max_tokens


def _nbest(nbest: Sequence[Finished]) -> list[dict]:
    return [{"text": f.text, "token_ids": list(f.token_ids), "score": f.score,
             "rescored": f.rescored} for f in nbest]


def _usage(prompt_tokens: int, replies: Sequence[Sequence[Finished]]) -> dict:
    completion = sum(len(r[0].token_ids) + r[0].ended for r in replies)  # the end counts
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def completion_response(model: str, prompt_tokens: int,
                        replies: Sequence[Sequence[Finished]]) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": r[0].text, "token_ids": list(r[0].token_ids),
                         "finish_reason": "stop" if r[0].ended else "length",
                         "logprobs": None, "nbest": _nbest(r)} for i, r in enumerate(replies)],
            "usage": _usage(prompt_tokens, replies)}


def chat_response(model: str, prompt_tokens: int, reply: Sequence[Finished]) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply[0].text},
                         "finish_reason": "stop" if reply[0].ended else "length",
                         "nbest": _nbest(reply)}],
            "usage": _usage(prompt_tokens, [reply])}
