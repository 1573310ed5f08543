"""One request's results as answers, torch-free: the one place that picks the returned choices
(the best of best_of), decodes them, and renders metaseq's or OpenAI's shape, whole or as
server-sent events. The HTTP routes and ``LLM`` both use it.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Iterator, Sequence

from .request import CompletionRequest
from .response import (SSE_DONE, ChoiceResult, build_choice, metaseq_response,
                       openai_response, sse, stream_chunk, stream_logprobs)
from .results import Delta, SeqResult

METASEQ, OPENAI = "metaseq", "openai"


def pick_best(total_logprobs: Sequence[float], n: int) -> list[int]:
    """Indices of the n best of best_of samples by total log-prob, best first (ties keep
    order)."""
    return sorted(range(len(total_logprobs)), key=lambda i: -total_logprobs[i])[:n]


class Renderer:
    """Answers for one request. ``tok``: the tokenizer (``TextTokenizer``); ``model``,
    ``request_id`` and ``created`` go into every envelope."""

    def __init__(self, tok, request: CompletionRequest, *, model: str, request_id: str,
                 created: int):
        self.tok, self.request = tok, request
        self.model, self.request_id, self.created = model, request_id, created

    # -- whole answers -----------------------------------------------------------------------

    def chosen(self, results: Sequence[SeqResult]) -> list[SeqResult]:
        """The n results returned per prompt, in prompt order: the best of best_of copies by
        total log-prob (copy order when best_of == n, so that indices match a stream's)."""
        options = self.request.sampling
        by_prompt: dict[int, list[SeqResult]] = {}
        for r in results:
            by_prompt.setdefault(r.prompt_index, []).append(r)
        out = []
        for p in sorted(by_prompt):
            copies = sorted(by_prompt[p], key=lambda r: r.copy)
            order = (range(len(copies)) if options.best_of == options.n
                     else pick_best([c.total_logprob for c in copies], options.n))
            out += [copies[i] for i in order]
        return out

    def choice(self, r: SeqResult) -> ChoiceResult:
        return build_choice(
            self.tok, prompt=r.prompt, generated=r.generated, echo=self.request.sampling.echo,
            prompt_logprobs=r.prompt_logprobs, generated_logprobs=r.logprobs,
            prompt_top=r.prompt_tops, generated_top=r.tops, finish_reason=r.finish_reason,
            prompt_index=r.prompt_index, truncated=r.truncated, text_bytes=r.text_bytes)

    def choices(self, results: Sequence[SeqResult]) -> list[ChoiceResult]:
        return [self.choice(r) for r in self.chosen(results)]

    def body(self, api: str, results: Sequence[SeqResult]) -> dict:
        """The JSON answer of ``api`` (METASEQ or OPENAI)."""
        choices = self.choices(results)
        if api == OPENAI:
            return openai_response(choices, request=self.request, model=self.model,
                                   request_id=self.request_id, created=self.created)
        return metaseq_response(choices, model=self.model, request_id=self.request_id,
                                created=self.created)

    # -- streams -----------------------------------------------------------------------------

    def _chunk(self, index: int, text: str, finish: str | None = None,
               logprobs: dict | None = None) -> bytes:
        return stream_chunk(request_id=self.request_id, model=self.model, created=self.created,
                            index=index, text=text, finish_reason=finish, logprobs=logprobs,
                            with_usage=self.request.include_usage)

    def stream(self, prompts: Sequence[Sequence[int]], deltas: Iterable[Delta]) -> Iterator[bytes]:
        """Server-sent events: with echo, each sequence's prompt first (``prompts``: the
        model inputs, leading </s> first, one per sequence), then the text of each delta (a
        UTF-8 character split across deltas waits for its end), the usage when asked for, and
        [DONE]. An ``EngineError`` raised by ``deltas`` propagates to the caller."""
        options, tok = self.request.sampling, self.tok
        decoders: dict[int, codecs.IncrementalDecoder] = {}
        chars: dict[int, int] = {}  # characters streamed per choice: offsets continue there
        completion_tokens = 0
        if options.echo:
            for i, prompt in enumerate(prompts):
                text = tok.decode(prompt[1:])
                chars[i] = len(text)
                yield self._chunk(i, text)
        for delta in deltas:
            dec = decoders.setdefault(delta.index,
                                      codecs.getincrementaldecoder("utf-8")("replace"))
            text = dec.decode(delta.text, final=delta.finish_reason is not None)
            logprobs = None if options.logprobs is None else stream_logprobs(
                tok, delta.tokens, chars.get(delta.index, 0), bool(options.logprobs))
            chars[delta.index] = chars.get(delta.index, 0) + len(text)
            completion_tokens += len(delta.tokens)
            yield self._chunk(delta.index, text, delta.finish_reason, logprobs)
        if self.request.include_usage:
            yield self.usage_chunk(prompts, completion_tokens)
        yield SSE_DONE

    def usage_chunk(self, prompts: Sequence[Sequence[int]], completion_tokens: int) -> bytes:
        """OpenAI's last chunk with ``stream_options.include_usage``: no choices, the usage
        (each prompt counted once, as in a whole answer)."""
        per_prompt = len(prompts) // max(1, len(self.request.prompts))
        prompt_tokens = sum(len(p) - 1 for p in prompts[::max(1, per_prompt)])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return sse({"id": self.request_id, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": [], "usage": usage})

