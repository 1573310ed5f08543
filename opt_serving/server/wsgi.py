"""The HTTP server around the Flask app: waitress, hardened against clients that misbehave.

waitress reads requests on one asynchronous loop and runs the app on worker threads, so a
slow client holds no thread, only a connection. What we add:

- errors waitress answers itself (a bad Content-Length, headers past its limit: 431, a body
  past its hard limit: 413) come back in the same JSON error shape as the app's, and count in
  ``/metrics`` under the route "unparsed";
- a connection limit well above the worker threads (default 100 in waitress: a few hundred
  trickling clients would lock everyone else out), with ``poll`` instead of ``select`` (which
  cannot watch descriptors past 1024) and the process's open-file limit raised to fit;
- a read deadline per request: a client that has not sent its headers and body within
  ``read_timeout_s`` of its first byte is disconnected (waitress's own timeout only counts
  silence, so one byte every few seconds would hold a connection for ever).
"""

from __future__ import annotations

import json
import resource
import time

import waitress
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from opt_serving.protocol import error_body

CONNECTION_LIMIT = 4096
_KINDS = {413: "body_too_large", 431: "headers_too_large"}


def _raise_open_file_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def create_server(app, *, host: str, port: int, threads: int, max_body_bytes: int,
                  read_timeout_s: float, on_error=None):
    """A waitress server for ``app``; ``on_error(status)`` counts the errors waitress answers
    without calling the app."""

    class JsonErrorTask(ErrorTask):
        def execute(self):
            e = self.request.error
            kind = "invalid_request_error" if e.code < 500 else "server_error"
            body = json.dumps(error_body(f"{e.reason}: {e.body}", type=kind,
                                         code=_KINDS.get(e.code, "bad_request"))).encode()
            self.status = f"{e.code} {e.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)
            if on_error is not None:
                on_error(e.code)

    class Channel(HTTPChannel):
        error_task_class = JsonErrorTask
        reading_since: float | None = None  # when the request being read sent its first byte

        def received(self, data):
            if data and self.request is None:
                self.reading_since = time.monotonic()
            try:
                return super().received(data)
            finally:
                if self.request is None:
                    self.reading_since = None

    files = _raise_open_file_limit(CONNECTION_LIMIT + 256)
    server = waitress.create_server(
        app, host=host, port=port, threads=threads, ident="opt-serve",
        connection_limit=max(4 * threads, min(CONNECTION_LIMIT, files - 256)),
        asyncore_use_poll=True, cleanup_interval=max(0.2, min(30.0, read_timeout_s / 4)),
        max_request_body_size=max(64 << 20, 4 * max_body_bytes))
    server.channel_class = Channel
    idle_maintenance = server.maintenance

    def maintenance(now):
        idle_maintenance(now)
        late = time.monotonic() - read_timeout_s
        for channel in list(server.active_channels.values()):
            since = getattr(channel, "reading_since", None)
            if since is not None and since < late:
                channel.will_close = True

    server.maintenance = maintenance
    return server
