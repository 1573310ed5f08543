"""What the routes share: the ``Service`` (engine, tokenizer, limits, names) and how an
answer or an error is written."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

from flask import Response, current_app, request

from constants import ServiceConstants
from opt_serving.runtime.engine import Engine
from opt_serving.tokenizer import TextTokenizer

log = logging.getLogger("opt_serve.http")


@dataclass(frozen=True)
class Service:
    engine: Engine  # or runtime.beams.BeamLoop (the same loop, another core)
    tokenizer: TextTokenizer  # metaseq's BPE, the demo's stand-in, or BlenderBot's Codec
    limits: ServiceConstants  # max_seq_len is the effective per-sequence limit
    model_name: str
    api_key: str | None = None
    world_size: int = 1
    served_names: tuple[str, ...] = ()  # what OpenAI's `model` may name (model_name too)
    # Long texts are tokenised one at a time (the tokenizer leaves the interpreter lock, but
    # a flood of them would still take every core from the requests being served).
    long_texts: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))

    def serves(self, name: str) -> bool:
        return name == self.model_name or name in self.served_names


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json",
                    headers=headers)


def error_kind(status: int, code: str | None) -> str:
    return code or {400: "bad_request", 401: "unauthorized", 404: "not_found",
                    405: "method_not_allowed", 413: "body_too_large", 429: "queue_full",
                    431: "headers_too_large", 504: "timeout"}.get(status, "internal")


def fail(status: int, body: dict, headers: dict | None = None) -> Response:
    """An error answer, counted in /metrics by kind (and logged when it is ours)."""
    err = body["error"]
    current_app.extensions["opt_serve_metrics"].errors.labels(
        error_kind(status, err.get("code"))).inc()
    if status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.path, status, err["message"])
    return json_response(body, status, headers)


