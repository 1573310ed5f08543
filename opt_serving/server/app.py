"""The HTTP layer: a Flask app factory over an ``Engine`` (no module-level state).

Routes: metaseq's ``POST /completions`` and its engine aliases, OpenAI's ``POST
/v1/completions`` (``stream: true`` as server-sent events) and ``GET /v1/models``, ``GET
/healthz``, ``GET /readyz`` and ``GET /metrics``. Every error is JSON in the contract's shape,
404 / 405 / 500 included: ParlAI retries forever on anything that is not JSON.
"""

from __future__ import annotations

import codecs
import hmac
import json
import logging
import time
from dataclasses import dataclass

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from constants import ServiceConstants
from opt_serving.decoding.scheduler import QueueFull
from opt_serving.protocol import (SSE_DONE, CompletionRequest, EngineError, RequestError,
                                  error_body, load_body, metaseq_response, openai_response,
                                  parse_body, parse_tokenize, sse, stream_chunk, stream_logprobs)
from opt_serving.tokenizer import TextTokenizer

from .engine import Engine
from .handles import RequestHandle, choices_for
from .metrics import Metrics

log = logging.getLogger("opt_serve.http")
METASEQ, OPENAI = "metaseq", "openai"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # load balancers send no key


@dataclass(frozen=True)
class Service:
    engine: Engine
    tokenizer: TextTokenizer  # metaseq's BPE, or the demo's byte-level stand-in
    limits: ServiceConstants
    model_name: str
    api_key: str | None = None
    world_size: int = 1


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json",
                    headers=headers)


def _error_kind(status: int, code: str | None) -> str:
    return code or {400: "bad_request", 401: "unauthorized", 404: "not_found",
                    405: "method_not_allowed", 413: "body_too_large", 429: "queue_full",
                    431: "headers_too_large", 504: "timeout"}.get(status, "internal")


def _read_body(limits: ServiceConstants) -> bytes:
    declared = request.content_length
    if declared is not None and declared > limits.max_body_bytes:
        raise RequestError(f"the request body is {declared} bytes; the limit is "
                           f"{limits.max_body_bytes}", code="body_too_large", status=413)
    return request.get_data(cache=False)


def _tokenize(tok, req: CompletionRequest) -> list[list[int]]:
    texts = [p for p in req.prompts if isinstance(p, str)]
    if not texts:
        return [list(p) for p in req.prompts]
    ids = tok.encode_batch(texts)
    for i, p in enumerate(ids):
        if not p:
            raise RequestError(f"prompt[{i}] encodes to no tokens", "prompt")
    return ids


def create_app(service: Service) -> Flask:
    app = Flask("opt_serve")
    metrics = Metrics(service.engine)
    app.extensions["opt_serve"] = service
    app.extensions["opt_serve_metrics"] = metrics
    engine, tok, limits = service.engine, service.tokenizer, service.limits

    def fail(status: int, body: dict, headers: dict | None = None) -> Response:
        err = body["error"]
        metrics.errors.labels(_error_kind(status, err.get("code"))).inc()
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, status, err["message"])
        return _json(body, status, headers)

    # -- errors: always JSON -----------------------------------------------------------------

    @app.errorhandler(RequestError)
    def _bad_request(e: RequestError):
        return fail(e.status, e.body())

    @app.errorhandler(QueueFull)
    def _queue_full(e: QueueFull):
        return fail(429, error_body(str(e), type="rate_limit_error", code="queue_full"),
                    {"Retry-After": "1"})

    @app.errorhandler(EngineError)
    def _engine_error(e: EngineError):
        return fail(e.status, e.body())

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error"}.get(e.code, "server_error")
        return fail(e.code or 500, error_body(f"{e.name}: {e.description}", type=kind,
                                              code=_error_kind(e.code or 500, None)))

    @app.errorhandler(Exception)
    def _internal(e: Exception):
        log.exception("unhandled error on %s", request.path)
        return fail(500, error_body(f"internal error: {type(e).__name__}: {e}",
                                    type="server_error", code="internal"))

    @app.after_request
    def _count(response: Response) -> Response:
        # Every answer, errors included; a stream counts here as it starts (200) and once
        # more in opt_serve_streams_ended when it ends.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http.labels(route, str(response.status_code)).inc()
        return response

    # -- auth --------------------------------------------------------------------------------

    @app.before_request
    def _auth():
        if service.api_key is None or request.path in OPEN_PATHS:
            return None  # no key configured: ParlAI's "Bearer <user name>" is accepted
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), service.api_key.encode()):
            return fail(401, error_body("missing or wrong API key: send 'Authorization: Bearer "
                                        "<key>'", type="authentication_error",
                                        code="invalid_api_key"))
        return None

    # -- health ------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz():
        return _json({"status": "alive"})

    @app.get("/readyz")
    def readyz():
        body = {"status": "ready" if engine.ready else "not ready", "model": service.model_name,
                "world_size": service.world_size, "reason": engine.failure}
        return _json(body, 200 if engine.ready else 503)

    @app.get("/metrics")
    def prometheus():
        data, content_type = metrics.render()
        return Response(data, content_type=content_type)

    @app.get("/v1/models")
    def models():
        return _json({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": 0,
            "owned_by": "opt-serving"}]})

    # -- completions -------------------------------------------------------------------------

    def complete(api: str) -> Response:
        started = time.monotonic()
        try:
            req = parse_body(_read_body(limits), limits)
            handle = engine.submit(req, _tokenize(tok, req))
        except (RequestError, QueueFull, EngineError) as e:
            status = getattr(e, "status", 429)
            metrics.requests.labels(api, str(status)).inc()
            raise
        headers = {}
        if handle.truncated_tokens:
            headers["X-Prompt-Truncated"] = str(handle.truncated_tokens)
        if req.stream:
            return Response(_events(handle, api, started), mimetype="text/event-stream",
                            headers={**headers, "Cache-Control": "no-cache",
                                     "X-Accel-Buffering": "no"})
        try:
            results = handle.result()
        except EngineError as e:
            engine.cancel(handle)
            metrics.requests.labels(api, str(e.status)).inc()
            raise
        choices = choices_for(tok, handle.request, results)
        name = req.model or service.model_name
        if api == OPENAI:
            body = openai_response(choices, request=handle.request, model=name,
                                   request_id=handle.id, created=handle.created)
        else:
            body = metaseq_response(choices, model=name, request_id=handle.id,
                                    created=handle.created)
        _observe(api, handle, started, 200)
        return _json(body, headers=headers)

    def _observe(api: str, handle: RequestHandle, started: float, status: int) -> None:
        metrics.latency.labels(api).observe(time.monotonic() - started)
        metrics.requests.labels(api, str(status)).inc()
        if handle.first_token_at is not None:
            metrics.ttft.labels(api).observe(handle.first_token_at - handle.submitted)

    def _events(handle: RequestHandle, api: str, started: float):
        """SSE chunks of a streamed completion. Closing the generator (the client went away:
        waitress stops writing and closes the app iterator) cancels the request."""
        req, name = handle.request, handle.request.model or service.model_name
        decoders, chars = {}, {}
        finished = False

        def chunk(index, text, finish=None, logprobs=None):
            return stream_chunk(request_id=handle.id, model=name, created=handle.created,
                                index=index, text=text, finish_reason=finish, logprobs=logprobs)
        try:
            if req.sampling.echo:
                for i, seq in enumerate(handle.seqs):
                    text = tok.decode(seq.prompt[1:])
                    chars[i] = len(text)
                    yield chunk(i, text)
            for delta in handle.stream():
                dec = decoders.setdefault(delta.index,
                                          codecs.getincrementaldecoder("utf-8")("replace"))
                text = dec.decode(delta.text, final=delta.finish_reason is not None)
                logprobs = None if req.sampling.logprobs is None else stream_logprobs(
                    tok, delta.tokens, chars.get(delta.index, 0), bool(req.sampling.logprobs))
                chars[delta.index] = chars.get(delta.index, 0) + len(text)
                yield chunk(delta.index, text, delta.finish_reason, logprobs)
            yield SSE_DONE
            finished = True
            _observe(api, handle, started, 200)
            metrics.streams.labels("completed").inc()
        except EngineError as e:
            finished = True
            metrics.errors.labels(_error_kind(e.status, e.code)).inc()
            metrics.streams.labels("cancelled" if e.status == 499 else "error").inc()
            metrics.requests.labels(api, str(e.status)).inc()
            yield sse(e.body())
            yield SSE_DONE
        finally:
            if not finished:  # the client went away (the generator was closed)
                metrics.streams.labels("cancelled").inc()
                metrics.requests.labels(api, "499").inc()
                engine.cancel(handle)

    @app.post("/tokenize")
    def tokenize():
        """The server's token ids of a prompt, as completions would see it (vLLM's route):
        clients that cannot load the tokenizer files count and place tokens exactly."""
        prompts = parse_tokenize(load_body(_read_body(limits), limits))
        if isinstance(prompts, str):
            ids = tok.encode(prompts)
            return _json({"tokens": ids, "count": len(ids), "max_model_len": limits.max_seq_len})
        ids = tok.encode_batch(list(prompts))
        return _json({"tokens": ids, "count": [len(i) for i in ids],
                      "max_model_len": limits.max_seq_len})

    for path in ("/completions", "/v1/engines/<engine_name>/completions",
                 "/v2/engines/<engine_name>/completions", "/engines/<engine_name>/completions"):
        app.add_url_rule(path, f"metaseq:{path}", lambda engine_name=None: complete(METASEQ),
                         methods=["POST"])
    app.add_url_rule("/v1/completions", "openai", lambda: complete(OPENAI), methods=["POST"])
    return app
