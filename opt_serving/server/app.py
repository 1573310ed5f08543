"""The HTTP layer: a Flask app factory over an ``Engine`` (no module-level state).

``create_app`` wires the routes of ``routes.ROUTES`` (the same table ``opt-serve --help``
lists), authentication, the metrics hooks and the error handlers: every error is JSON in the
contract's shape, 404 / 405 / 500 included, since ParlAI retries forever on anything that is
not JSON.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from opt_serving.decoding.scheduler import QueueFull
from opt_serving.protocol import EngineError, RequestError, error_body

from .metrics import Metrics
from .routes import ROUTES
from .service import Service, error_kind, fail

log = logging.getLogger("opt_serve.http")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # load balancers send no key


def create_app(service: Service, routes=ROUTES) -> Flask:
    """The app over ``service``: OPT's routes, or ``blender.BLENDER_ROUTES`` (BlenderBot 1)."""
    app = Flask("opt_serve")
    metrics = Metrics(service.engine)
    app.extensions["opt_serve"] = service
    app.extensions["opt_serve_metrics"] = metrics
    for route in routes:
        for path in route.paths:
            app.add_url_rule(path, f"{route.name}:{path}", route.view, methods=[route.method])
    _errors(app)

    @app.after_request
    def _count(response: Response) -> Response:
        # Every answer, errors included; a stream counts here as it starts (200) and once
        # more in opt_serve_streams_ended when it ends. No route (or not this method):
        # "unmatched"; refused before routing (wsgi): "unparsed".
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http.labels(route, str(response.status_code)).inc()
        return response

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

    return app


def _errors(app: Flask) -> None:
    """Every error as JSON."""

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
                                              code=error_kind(e.code or 500, None)))

    @app.errorhandler(Exception)
    def _internal(e: Exception):
        log.exception("unhandled error on %s", request.path)
        return fail(500, error_body(f"internal error: {type(e).__name__}: {e}",
                                    type="server_error", code="internal"))
