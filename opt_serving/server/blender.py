"""``opt-serve --model-file PATH|zoo:...``: BlenderBot 1 over HTTP (``protocol.seq2seq``).

The same app, server and loop machinery as OPT's opt-serve (authentication, JSON errors,
/metrics, /healthz, /readyz, slow-client limits), with its own routes: OpenAI's completions
and chat completions with ParlAI's option names and the n-best list, and ``/tokenize`` taking
``messages``. metaseq's ``/completions`` is OPT's and is not served here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

from flask import Response

from constants import DEFAULTS, ServiceConstants
from opt_serving.protocol import EngineError, RequestError, load_body
from opt_serving.protocol import seq2seq as wire

from .routes import ROUTES, Route, _service, read_body
from .service import Service, json_response

log = logging.getLogger("opt_serve")


def _options(svc: Service, req: wire.BeamRequest):
    from opt_serving.blenderbot.llm import search_options

    if req.model is not None and not svc.serves(req.model):
        raise RequestError(f"The model `{req.model}` does not exist.", "model",
                           code="model_not_found", status=404)
    try:
        return search_options(svc.tokenizer.defaults, dict(req.options))
    except (TypeError, ValueError) as e:
        name = next((n for n, _ in req.options if n in str(e)), None)
        raise RequestError(str(e), name) from None


def _contexts(svc: Service, req: wire.BeamRequest) -> list[list[int]]:
    codec = svc.tokenizer
    try:
        if req.chat:
            return [codec.history_vector(req.turns)]
        return [codec.encode(p) for p in req.prompts]
    except ValueError as e:
        raise RequestError(str(e), "prompt") from None


def _run(svc: Service, contexts, options):
    handle = svc.engine.submit(contexts, options)
    try:
        return [svc.tokenizer.finished(h) for h in handle.result()]
    except EngineError:
        svc.engine.cancel(handle)
        raise


def _answer(api: str, build) -> Response:
    svc, metrics = _service()
    try:
        body = build(svc)
    except (RequestError, EngineError) as e:
        metrics.requests.labels(api, str(e.status)).inc()
        raise
    metrics.requests.labels(api, "200").inc()
    return json_response(body)


def completions() -> Response:
    def build(svc):
        req = wire.parse_completion(load_body(read_body(svc), svc.limits))
        options = _options(svc, req)
        contexts = _contexts(svc, req)
        return wire.completion_response(req.model or svc.model_name,
                                        sum(map(len, contexts)), _run(svc, contexts, options))
    return _answer("openai", build)


def chat() -> Response:
    def build(svc):
        req = wire.parse_chat(load_body(read_body(svc), svc.limits))
        options = _options(svc, req)
        contexts = _contexts(svc, req)
        (reply,) = _run(svc, contexts, options)
        return wire.chat_response(req.model or svc.model_name, len(contexts[0]), reply)
    return _answer("chat", build)


def tokenize() -> Response:
    """The encoder input ParlAI builds for a prompt or a conversation."""
    svc, _ = _service()
    req = wire.parse_tokenize(load_body(read_body(svc), svc.limits))
    (ids,) = _contexts(svc, req)
    return json_response({"tokens": ids, "count": len(ids),
                          "max_model_len": svc.limits.max_seq_len})


_SHARED = {r.name: r for r in ROUTES}
BLENDER_ROUTES = (
    Route("openai", "POST", ("/v1/completions",), completions,
          "completions with ParlAI's options (beam_size, beam_min_length, ...) and nbest"),
    Route("chat", "POST", ("/v1/chat/completions",), chat,
          "a reply to a conversation (a system message is the persona)"),
    Route("tokenize", "POST", ("/tokenize",), tokenize,
          "the encoder input ParlAI builds for a prompt or for messages"),
    _SHARED["models"], _SHARED["healthz"], _SHARED["readyz"], _SHARED["metrics"],
)


@dataclasses.dataclass(frozen=True)
class BlenderServeOptions:
    model_file: str
    datapath: str | None = None
    constants: ServiceConstants = DEFAULTS
    host: str = "127.0.0.1"
    port: int = 6010
    api_key: str | None = None
    device: str | None = None
    dtype: str | None = None
    model_name: str | None = None
    ready_file: str | None = None
    threads: int | None = None


def serve_blenderbot(opts: BlenderServeOptions) -> int:
    """Load the model, start the loop, serve until SIGINT / SIGTERM."""
    from opt_serving.blenderbot import files
    from opt_serving.blenderbot.llm import Codec, build_engine, to_device
    from opt_serving.runtime.beams import BeamLoop
    from opt_serving.runtime.loop import start_loaded

    from .app import create_app
    from .serve import write_ready_file
    from .wsgi import create_server

    c = opts.constants

    def build():  # on the loop's own thread (runtime.loop.start_loaded)
        loaded = files.load(opts.model_file, datapath=opts.datapath)
        model = to_device(loaded.model, opts.device, opts.dtype)
        core = build_engine(model, loaded, min(c.max_batch_size, 256), None)
        return BeamLoop(core, request_timeout_s=c.request_timeout_s), (loaded, model)

    loop, (loaded, model) = start_loaded(build)
    core = loop.core
    # What /v1/models and /tokenize report as max_model_len: the encoder's input.
    limits = dataclasses.replace(c, max_seq_len=core.context,
                                 default_max_tokens=min(c.default_max_tokens, core.context // 2))
    name = opts.model_name or loaded.name
    app = create_app(Service(engine=loop, tokenizer=Codec(loaded, core.context), limits=limits,
                             model_name=name, served_names=(name,), api_key=opts.api_key),
                     routes=BLENDER_ROUTES)
    metrics = app.extensions["opt_serve_metrics"]
    server = create_server(
        app, host=opts.host, port=opts.port,
        threads=max(16, opts.threads or core.batch.groups + c.max_queued_requests),
        max_body_bytes=limits.max_body_bytes, read_timeout_s=limits.client_read_timeout_s,
        on_error=lambda status: metrics.http.labels("unparsed", str(status)).inc())
    url = f"http://{opts.host}:{int(server.effective_port)}"
    log.info("opt-serve: BlenderBot 1 %s (%s, %d+%d layers, width %d), %d requests at once, "
             "beams up to %d, context %d tokens, replies up to %d tokens, on %s, serving on %s",
             name, model.cfg.variant, model.cfg.num_encoder_layers,
             model.cfg.num_decoder_layers, model.cfg.embed_dim, core.batch.groups,
             core.max_beams, core.context, core.max_tokens, next(model.parameters()).device,
             url)
    if opts.ready_file:
        write_ready_file(opts.ready_file, {"url": url, "pid": os.getpid(), "workers": {},
                                           "world_size": 1, "model": name})

    def _interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _interrupt)
    server.run()
    log.info("shutting down")
    loop.shutdown()
    return 0
