"""The routes, one small function each, and ``ROUTES``: the table the app is built from and
``opt-serve --help`` lists, so the two cannot drift.

A completion is parsed once (``protocol.parse_body``), tokenised here (never holding the
interpreter lock for long: see ``encode_texts``), submitted to the engine, and rendered by
``protocol.Renderer``, whole or as server-sent events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from flask import Response, current_app, request

from opt_serving.decoding.scheduler import QueueFull
from opt_serving.protocol import (METASEQ, OPENAI, SSE_DONE, CompletionRequest, EngineError,
                                  Renderer, RequestError, load_body, parse_body, parse_tokenize,
                                  sse)
from opt_serving.runtime.handles import RequestHandle

from .service import Service, error_kind, json_response
from .metrics import Metrics

# Texts longer than this (in characters, all prompts of a request together) are tokenised one
# request at a time: the encoder leaves the interpreter lock, but not the cores.
LONG_TEXT_CHARS = 64 * 1024


def _service() -> tuple[Service, Metrics]:
    return current_app.extensions["opt_serve"], current_app.extensions["opt_serve_metrics"]


def read_body(svc: Service) -> bytes:
    declared = request.content_length
    if declared is not None and declared > svc.limits.max_body_bytes:
        raise RequestError(f"the request body is {declared} bytes; the limit is "
                           f"{svc.limits.max_body_bytes}", code="body_too_large", status=413)
    return request.get_data(cache=False)


def encode_texts(svc: Service, texts: list[str]) -> list[list[int]]:
    """Token ids of request texts. A text longer than any ``max_seq_len`` tokens can span is
    refused without encoding it (a sequence cannot hold it, and encoding megabytes costs
    seconds of a core); the rest go through ``encode_batch``, which leaves the interpreter lock
    to the other threads (``encode`` holds it for the whole text)."""
    tok, limit = svc.tokenizer, svc.limits.max_seq_len
    longest = limit * tok.max_token_bytes  # characters <= bytes <= tokens x longest token
    for i, text in enumerate(texts):
        if len(text) > longest:
            where = f"prompt[{i}]" if len(texts) > 1 else "prompt"
            raise RequestError(
                f"{where} is {len(text):,} characters long, more than {limit} tokens (this "
                f"server's limit per sequence) can span ({longest:,} characters): send the "
                "end of the text", "prompt")
    if sum(len(t) for t in texts) <= LONG_TEXT_CHARS:
        return tok.encode_batch(texts)
    if not svc.long_texts.acquire(timeout=svc.limits.request_timeout_s):
        raise EngineError(503, "busy tokenising other long prompts; retry later",
                          code="tokenizer_busy")
    try:
        return tok.encode_batch(texts)
    finally:
        svc.long_texts.release()


def _prompt_ids(svc: Service, req: CompletionRequest) -> list[list[int]]:
    texts = [p for p in req.prompts if isinstance(p, str)]
    if not texts:
        return [list(p) for p in req.prompts]
    ids = encode_texts(svc, texts)
    for i, p in enumerate(ids):
        if not p:
            raise RequestError(f"prompt[{i}] encodes to no tokens", "prompt")
    return ids


# -- health and information ---------------------------------------------------------------------

def healthz() -> Response:
    return json_response({"status": "alive"})


def readyz() -> Response:
    svc, _ = _service()
    ready = svc.engine.ready
    return json_response({"status": "ready" if ready else "not ready", "model": svc.model_name,
                          "world_size": svc.world_size, "reason": svc.engine.failure},
                         200 if ready else 503)


def prometheus() -> Response:
    _, metrics = _service()
    data, content_type = metrics.render()
    return Response(data, content_type=content_type)


def models() -> Response:
    svc, _ = _service()
    return json_response({"object": "list", "data": [{
        "id": svc.model_name, "object": "model", "created": 0, "owned_by": "opt-serving",
        "max_model_len": svc.limits.max_seq_len}]})


def tokenize() -> Response:
    """The server's token ids of a prompt, as completions would see it (vLLM's route):
    clients that cannot load the tokenizer files count and place tokens exactly."""
    svc, _ = _service()
    prompts = parse_tokenize(load_body(read_body(svc), svc.limits))
    single = isinstance(prompts, str)
    ids = encode_texts(svc, [prompts] if single else list(prompts))
    limit = svc.limits.max_seq_len
    if single:
        return json_response({"tokens": ids[0], "count": len(ids[0]), "max_model_len": limit})
    return json_response({"tokens": ids, "count": [len(i) for i in ids],
                          "max_model_len": limit})


# -- completions ----------------------------------------------------------------------------------

def complete(api: str) -> Response:
    svc, metrics = _service()
    started = time.monotonic()
    try:
        req = parse_body(read_body(svc), svc.limits)
        if api == OPENAI and req.model is not None and not svc.serves(req.model):
            raise RequestError(f"The model `{req.model}` does not exist.", "model",
                               code="model_not_found", status=404)
        handle = svc.engine.submit(req, _prompt_ids(svc, req))
    except (RequestError, QueueFull, EngineError) as e:
        metrics.requests.labels(api, str(getattr(e, "status", 429))).inc()
        raise
    renderer = Renderer(svc.tokenizer, handle.request, model=req.model or svc.model_name,
                        request_id=handle.id, created=handle.created)
    headers = {}
    if handle.truncated_tokens:
        headers["X-Prompt-Truncated"] = str(handle.truncated_tokens)
    if req.stream:
        return Response(_events(svc, metrics, handle, renderer, api, started),
                        mimetype="text/event-stream",
                        headers={**headers, "Cache-Control": "no-cache",
                                 "X-Accel-Buffering": "no"})
    try:
        results = handle.result()
    except EngineError as e:
        svc.engine.cancel(handle)
        metrics.requests.labels(api, str(e.status)).inc()
        raise
    body = renderer.body(api, results)
    _observe(metrics, api, handle, started, 200)
    return json_response(body, headers=headers)


def _observe(metrics: Metrics, api: str, handle: RequestHandle, started: float,
             status: int) -> None:
    metrics.latency.labels(api).observe(time.monotonic() - started)
    metrics.requests.labels(api, str(status)).inc()
    if handle.first_token_at is not None:
        metrics.ttft.labels(api).observe(handle.first_token_at - handle.submitted)


def _events(svc: Service, metrics: Metrics, handle: RequestHandle, renderer: Renderer,
            api: str, started: float):
    """SSE chunks of a streamed completion. Closing the generator (the client went away:
    waitress stops writing and closes the app iterator) cancels the request."""
    finished = False
    try:
        yield from renderer.stream([s.prompt for s in handle.seqs], handle.stream())
        finished = True
        _observe(metrics, api, handle, started, 200)
        metrics.streams.labels("completed").inc()
    except EngineError as e:
        finished = True
        metrics.errors.labels(error_kind(e.status, e.code)).inc()
        metrics.streams.labels("cancelled" if e.status == 499 else "error").inc()
        metrics.requests.labels(api, str(e.status)).inc()
        yield sse(e.body())
        yield SSE_DONE
    finally:
        if not finished:  # the client went away (the generator was closed)
            metrics.streams.labels("cancelled").inc()
            metrics.requests.labels(api, "499").inc()
            svc.engine.cancel(handle)


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    paths: tuple[str, ...]
    view: Callable[..., Response]
    summary: str  # for opt-serve --help


def _metaseq(engine_name: str | None = None) -> Response:
    return complete(METASEQ)


ROUTES = (
    Route("metaseq", "POST", ("/completions", "/v1/engines/<engine_name>/completions",
                              "/v2/engines/<engine_name>/completions",
                              "/engines/<engine_name>/completions"), _metaseq,
          "metaseq's completions (every field of its contract)"),
    Route("openai", "POST", ("/v1/completions",), lambda: complete(OPENAI),
          "OpenAI's completions (stream: true as server-sent events)"),
    Route("models", "GET", ("/v1/models",), models, "the served model and its max_model_len"),
    Route("tokenize", "POST", ("/tokenize",), tokenize,
          "a prompt's token ids, as completions see them (vLLM's route)"),
    Route("healthz", "GET", ("/healthz",), healthz, "200 while the process runs"),
    Route("readyz", "GET", ("/readyz",), readyz,
          "200 only when the model is loaded and every rank is alive, else 503"),
    Route("metrics", "GET", ("/metrics",), prometheus, "Prometheus metrics"),
)


def routes_help() -> str:
    """The route list of ``opt-serve --help``, from ROUTES."""
    lines = []
    for r in ROUTES:
        first, *more = (p.replace("<engine_name>", "<e>") for p in r.paths)
        lines.append(f"  {r.method:<5}{first:<17} {r.summary}")
        if more:
            lines.append(f"{'':7}also {', '.join(more)}")
    return "\n".join(lines)
