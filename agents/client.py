"""HTTP client for a metaseq-compatible completions API (opt-serve or metaseq-api-local).

ParlAI's client has no timeout and retries forever on anything but a 200 JSON answer (ParlAI
#4745). This one bounds everything: a deadline per request (headers and body together), a
bounded number of retries with exponential backoff (each in the calling thread, so one call
backing off never delays another in flight), no retry on answers that will not change (4xx
other than 408/429), and errors that say which URL failed and why. Bodies are read with the
wire protocol's own reader (``opt_serving.protocol``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from opt_serving.protocol import first_text
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

# Worth another try: the server may be busy (429), restarting (502/503), or slow (408, 504).
# 500 too, since metaseq answers transient failures with it.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ServiceError(RuntimeError):
    """A request that failed for good; `url` names the endpoint, `status` the last HTTP code."""

    def __init__(self, message: str, *, url: str, status: int | None = None,
                 attempts: int = 1, unreachable: bool = False):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts
        self.unreachable = unreachable  # no connection at all: every other call will fail too


class CompletionsError(ServiceError):
    pass


class _Retry(Exception):
    """An attempt that failed in a way another attempt may fix."""

    def __init__(self, message: str, status: int | None = None, wait_s: float | None = None,
                 unreachable: bool = False):
        super().__init__(message)
        self.status = status
        self.wait_s = wait_s
        self.unreachable = unreachable


def normalise_url(url: str) -> str:
    """ParlAI accepts servers without a scheme ("localhost:6010"): http:// is implied.
    Anything that cannot be an HTTP server's address is a ValueError naming it."""
    url = url.strip()
    if not url:
        raise ValueError("empty server URL")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port past 65535
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http:// and https:// servers are supported")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    return url.rstrip("/")


def completions_url(server: str) -> str:
    base = normalise_url(server)
    return base if base.endswith("/completions") else base + "/completions"


@dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 60.0  # --metaseq-server-timeout: one request, not the whole call
    connect_timeout_s: float = 3.0
    max_retries: int = 3  # --metaseq-max-retry-api
    backoff_s: float = 0.25  # first wait; doubles per retry
    max_backoff_s: float = 8.0

    def wait(self, attempt: int, hint: float | None = None) -> float:
        if hint is not None:  # the server's Retry-After, within our own bound
            return min(max(hint, 0.0), self.max_backoff_s)
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)


def _error_message(response: requests.Response, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw[:200].decode("utf-8", "replace").strip() or response.reason or ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return json.dumps(body)[:200]


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


MAX_ANSWER_BYTES = 64 << 20  # a completion or search answer is a few KB


def request_json(session: requests.Session, method: str, url: str, policy: RetryPolicy, *,
                 error: type[ServiceError] = ServiceError,
                 sleep: Callable[[float], None] = time.sleep, **kwargs) -> object:
    """One HTTP call with bounded retries; returns the decoded JSON body of a 2xx answer.
    Each attempt, headers and body together, ends within ``policy.timeout_s``: a server that
    trickles bytes is cut off at that deadline, not only when it falls silent."""
    attempts = policy.max_retries + 1
    last: _Retry | None = None
    for attempt in range(attempts):
        if attempt:
            sleep(policy.wait(attempt - 1, last.wait_s if last else None))
        try:
            return _attempt(session, method, url, policy, kwargs)
        except _Retry as exc:
            last = exc
        except _Fatal as exc:
            raise error(f"{url}: {exc}", url=url, status=exc.status, attempts=attempt + 1,
                        unreachable=exc.unreachable) from None
    assert last is not None
    raise error(f"{url}: {last} (gave up after {attempts} attempt"
                f"{'s' if attempts > 1 else ''})", url=url, status=last.status,
                attempts=attempts, unreachable=last.unreachable)


class _Fatal(Exception):
    """An attempt that failed in a way no retry fixes (a bad request, a redirect loop)."""

    def __init__(self, message: str, status: int | None = None, unreachable: bool = False):
        super().__init__(message)
        self.status, self.unreachable = status, unreachable


def _attempt(session: requests.Session, method: str, url: str, policy: RetryPolicy,
             kwargs: dict) -> object:
    deadline = time.monotonic() + policy.timeout_s
    watchdog = threading.Timer(policy.timeout_s, _cut_off, (session, threading.get_ident()))
    watchdog.daemon = True
    watchdog.start()
    try:
        response = session.request(method, url, timeout=(policy.connect_timeout_s,
                                                         policy.timeout_s), stream=True, **kwargs)
        with response:
            body = b""
            for chunk in response.iter_content(65536):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise _Fatal(f"answered more than {MAX_ANSWER_BYTES >> 20} MiB",
                                 response.status_code)
    except requests.ConnectionError as exc:
        if time.monotonic() >= deadline:
            raise _Retry(_too_slow(policy)) from None
        if isinstance(exc, requests.ConnectTimeout):
            reason = f"no connection within {policy.connect_timeout_s:g}s"
        elif "refused" in str(exc).lower():
            reason = "connection refused (is the server running?)"
        else:
            reason = f"connection failed ({type(exc).__name__})"
        raise _Retry(reason, unreachable=True) from None
    except requests.Timeout:
        raise _Retry(_too_slow(policy)) from None
    except requests.TooManyRedirects:
        raise _Fatal("redirects in a loop (more than 30 redirects)") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema) as exc:
        raise _Fatal(f"not a usable URL ({exc})", unreachable=True) from None
    except requests.RequestException as exc:  # broken chunking, bad gzip, a cut-off body
        if time.monotonic() >= deadline:
            raise _Retry(_too_slow(policy)) from None
        raise _Retry(f"broken answer ({type(exc).__name__}: {str(exc)[:120]})") from None
    finally:
        watchdog.cancel()
    if time.monotonic() >= deadline:  # cut off mid-answer: what arrived is not the answer
        raise _Retry(_too_slow(policy))
    status = response.status_code
    if status in RETRY_STATUSES:
        raise _Retry(f"HTTP {status}: {_error_message(response, body)}", status,
                     _retry_after(response))
    if not 200 <= status < 300:
        # A bad request stays bad: report it at once with the server's own message.
        raise _Fatal(f"answered HTTP {status}: {_error_message(response, body)}", status)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        kind = response.headers.get("Content-Type", "no content type")
        raise _Retry(f"answered non-JSON ({kind}): {body[:120]!r}", status) from None


def _too_slow(policy: RetryPolicy) -> str:
    return f"server too slow: no answer within {policy.timeout_s:g}s"


def _cut_off(session: requests.Session, thread: int) -> None:
    """The deadline passed: shut the socket the calling thread is reading (it then raises)."""
    conn = session.in_flight.get(thread)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def parse_completion(body: object, url: str = "") -> str:
    """The text of the first choice of a completions response."""
    try:
        return first_text(body)
    except ValueError as exc:
        raise CompletionsError(f"{url} answered {exc}", url=url) from None


def make_session(pool_size: int) -> requests.Session:
    """A session whose connections register themselves, per calling thread, in
    ``session.in_flight`` while they carry a request (so a deadline can cut one off)."""
    session = requests.Session()
    in_flight: dict[int, HTTPConnection] = {}

    def watched(base):
        class Connection(base):
            def request(self, *args, **kwargs):
                in_flight[threading.get_ident()] = self
                return super().request(*args, **kwargs)
        return Connection

    class Pool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    # Concurrent module calls share one connection pool; size it to the worker count.
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1))
    adapter.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.in_flight = in_flight
    return session


class CompletionsClient:
    """POSTs one prompt per request to {server}/completions, as ParlAI's BB3 client does."""

    def __init__(self, server: str, policy: RetryPolicy = RetryPolicy(), *,
                 api_key: str = "bb3", pool_size: int = 8):
        self.url = completions_url(server)
        self.policy = policy
        # metaseq wants a bearer token; ParlAI sends the user name.
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._session = make_session(pool_size)

    def complete_payload(self, payload: dict) -> str:
        body = request_json(self._session, "POST", self.url, self.policy,
                            error=CompletionsError, json=payload, headers=self._headers)
        return parse_completion(body, self.url)

    def close(self) -> None:
        self._session.close()
