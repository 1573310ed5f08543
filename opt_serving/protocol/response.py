"""The completions answers, torch-free: one choice built from token ids, rendered in metaseq's
shape, OpenAI's shape or as server-sent-event chunks, and read back by clients.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from .request import CompletionRequest, error_body
from .results import TopK

SSE_DONE = b"data: [DONE]\n\n"


class EngineError(Exception):
    """A request the engine could not finish: its HTTP status and JSON error body."""

    def __init__(self, status: int, message: str, type: str = "server_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, code=self.code)


def timeout_error(seconds: float) -> EngineError:
    return EngineError(504, f"the request did not finish within {seconds:g} s; its KV cache was "
                       "freed", type="timeout_error", code="timeout")


def char_offsets(pieces: Sequence[bytes]) -> list[int]:
    """Character offset of each piece in ``b"".join(pieces).decode()``: the number of
    characters that begin before it (a piece starting inside a character points past it)."""
    offsets, chars = [], 0
    for piece in pieces:
        offsets.append(chars)
        # Every byte except UTF-8 continuation bytes (0b10xxxxxx) starts a character.
        chars += sum(1 for b in piece if b & 0xC0 != 0x80)
    return offsets



def first_text(body: Any) -> str:
    """The text of the first choice of a completions answer (metaseq's or OpenAI's shape);
    ValueError, saying what came instead, when there is none."""
    try:
        text = body["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"JSON without choices[0].text: {json.dumps(body)[:200]}") from None
    if not isinstance(text, str):
        raise ValueError("a non-string choices[0].text")
    return text


@dataclass(frozen=True)
class ChoiceResult:
    """One returned completion, already decoded. With echo, tokens start with the leading
    "</s>" (a zero-width marker at offset 0, logprob None) and text starts with the prompt."""

    text: str
    tokens: tuple[str, ...]
    token_logprobs: tuple[float | None, ...]
    text_offset: tuple[int, ...]
    top_logprobs: tuple[dict[str, float] | None, ...] | None  # None when logprobs is 0
    finish_reason: str  # "stop" or "length"
    prompt_index: int
    prompt_tokens: int
    completion_tokens: int
    truncated_prompt_tokens: int = 0  # dropped from the left to fit max_tokens


def top_json(tok, pairs: TopK) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, lp in pairs:
        out.setdefault(tok.decode_token(token_id), lp)  # two ids may decode alike: keep best
    return out


def build_choice(tok, *, prompt: Sequence[int], generated: Sequence[int], echo: bool,
                 prompt_logprobs: Sequence[float], generated_logprobs: Sequence[float],
                 prompt_top: Sequence[TopK] | None, generated_top: Sequence[TopK] | None,
                 finish_reason: str, prompt_index: int, truncated: int = 0,
                 text_bytes: int | None = None) -> ChoiceResult:
    """A choice from ids. ``tok``: the Tokenizer. ``prompt``: the model input, leading </s>
    first; ``prompt_logprobs`` / ``prompt_top``: teacher-forced, one per ``prompt[1:]`` (read
    only with echo). ``generated``: the tokens to return (``StopStatus.keep_tokens``) and
    ``text_bytes`` the bytes of their text to keep (``keep_bytes``; a stop sequence may begin
    inside the last token). Tops are None when logprobs is 0."""
    shown = [*prompt[1:], *generated] if echo else list(generated)
    pieces = [tok.token_bytes(i) for i in shown]
    echoed = b"".join(pieces[:len(shown) - len(generated)])
    completion = b"".join(pieces[len(shown) - len(generated):])[:text_bytes]
    tokens = tuple(tok.decode_token(i) for i in shown)
    logprobs = tuple(generated_logprobs)
    offsets = tuple(char_offsets(pieces))
    tops = None if generated_top is None else tuple(top_json(tok, t) for t in generated_top)
    if echo:
        # metaseq's leading </s>: a zero-width marker whose log-prob is null (metaseq #87).
        tokens, offsets = ("</s>", *tokens), (0, *offsets)
        logprobs = (None, *prompt_logprobs, *logprobs)
        if tops is not None:
            tops = (None, *(top_json(tok, t) for t in prompt_top), *tops)
    return ChoiceResult(
        text=(echoed + completion).decode("utf-8", errors="replace"), tokens=tokens,
        token_logprobs=logprobs, text_offset=offsets, top_logprobs=tops,
        finish_reason=finish_reason, prompt_index=prompt_index, prompt_tokens=len(prompt) - 1,
        completion_tokens=len(generated), truncated_prompt_tokens=truncated)


def stream_logprobs(tok, tokens: Sequence[tuple[int, float, TopK | None]], offset: int,
                    with_top: bool) -> dict:
    """The logprobs of one stream chunk, from its (id, log-prob, top) triples: the same fields
    ``build_choice`` fills for a whole answer (``offset``: characters already streamed)."""
    pieces = [tok.token_bytes(t) for t, _, _ in tokens]
    return {"tokens": [tok.decode_token(t) for t, _, _ in tokens],
            "token_logprobs": [lp for _, lp, _ in tokens],
            "text_offset": [offset + o for o in char_offsets(pieces)],
            "top_logprobs": [None if top is None else top_json(tok, top)
                             for _, _, top in tokens] if with_top else None}


def new_request_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def logprobs_json(c: ChoiceResult) -> dict:
    return {"tokens": list(c.tokens), "token_logprobs": list(c.token_logprobs),
            "text_offset": list(c.text_offset),
            "top_logprobs": None if c.top_logprobs is None else list(c.top_logprobs)}


def _choice_json(c: ChoiceResult, index: int, with_logprobs: bool) -> dict:
    out = {"text": c.text, "index": index,
           "logprobs": logprobs_json(c) if with_logprobs else None,
           "finish_reason": c.finish_reason}
    if c.truncated_prompt_tokens:
        out["truncated_prompt_tokens"] = c.truncated_prompt_tokens
    return out


def _envelope(request_id: str | None, model: str, created: int | None) -> dict:
    return {"id": request_id or new_request_id(), "object": "text_completion",
            "created": int(time.time()) if created is None else created, "model": model}


def metaseq_response(choices: Sequence[ChoiceResult], *, model: str,
                     request_id: str | None = None, created: int | None = None) -> dict:
    """metaseq's shape: every choice carries logprobs (ParlAI reads token_logprobs), plus
    finish_reason on the choice (metaseq #643)."""
    return {**_envelope(request_id, model, created),
            "choices": [_choice_json(c, i, True) for i, c in enumerate(choices)]}


def usage_json(choices: Sequence[ChoiceResult]) -> dict:
    """Each prompt counted once, however many choices it has."""
    prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def without_marker(c: ChoiceResult) -> ChoiceResult:
    """An echo choice without metaseq's leading "</s>": OpenAI echoes only the prompt, and its
    client types every token log-prob as a number."""
    top = None if c.top_logprobs is None else c.top_logprobs[1:]
    return dataclasses.replace(c, tokens=c.tokens[1:], token_logprobs=c.token_logprobs[1:],
                               text_offset=c.text_offset[1:], top_logprobs=top)


def openai_response(choices: Sequence[ChoiceResult], *, request: CompletionRequest, model: str,
                    request_id: str | None = None, created: int | None = None) -> dict:
    """OpenAI's shape: logprobs only when asked for, a usage block, no "</s>" marker."""
    with_logprobs = request.sampling.logprobs is not None
    shown = [without_marker(c) for c in choices] if request.sampling.echo else choices
    return {**_envelope(request_id, model, created),
            "choices": [_choice_json(c, i, with_logprobs) for i, c in enumerate(shown)],
            "usage": usage_json(choices)}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def stream_chunk(*, request_id: str, model: str, created: int, index: int, text: str,
                 finish_reason: str | None = None, logprobs: dict | None = None,
                 with_usage: bool = False) -> bytes:
    """One server-sent event of a streamed completion; the stream ends with SSE_DONE.
    ``with_usage``: a ``"usage": null`` field, as OpenAI sends before the usage chunk."""
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
    body = {**_envelope(request_id, model, created), "choices": [choice]}
    return sse({**body, "usage": None} if with_usage else body)
