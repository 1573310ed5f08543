"""HTTP client for a metaseq-compatible completions API (opt-serve or metaseq-api-local).

ParlAI's client has no timeout and retries forever on anything but a 200 JSON answer (ParlAI
#4745). This one bounds everything: a per-request timeout, a bounded number of retries with
exponential backoff (each in the calling thread, so one call backing off never delays another
in flight), no retry on answers that will not change (4xx other than 408/429), and errors that
say which URL failed and why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

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
    """ParlAI accepts servers without a scheme ("localhost:6010"): http:// is implied."""
    url = url.strip()
    if not url:
        raise ValueError("empty server URL")
    if "://" not in url:
        url = "http://" + url
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


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason or ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return json.dumps(body)[:200]


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


def request_json(session: requests.Session, method: str, url: str, policy: RetryPolicy, *,
                 error: type[ServiceError] = ServiceError,
                 sleep: Callable[[float], None] = time.sleep, **kwargs) -> object:
    """One HTTP call with bounded retries; returns the decoded JSON body of a 2xx answer."""
    attempts = policy.max_retries + 1
    last: _Retry | None = None
    for attempt in range(attempts):
        if attempt:
            sleep(policy.wait(attempt - 1, last.wait_s if last else None))
        try:
            response = session.request(method, url, timeout=(policy.connect_timeout_s,
                                                             policy.timeout_s), **kwargs)
        except requests.ConnectionError as exc:
            if isinstance(exc, requests.ConnectTimeout):
                reason = f"no connection within {policy.connect_timeout_s:g}s"
            elif "refused" in str(exc).lower():
                reason = "connection refused (is the server running?)"
            else:
                reason = f"connection failed ({type(exc).__name__})"
            last = _Retry(reason, unreachable=True)
            continue
        except requests.Timeout:
            last = _Retry(f"no answer within {policy.timeout_s:g}s")
            continue
        if response.status_code in RETRY_STATUSES:
            last = _Retry(f"HTTP {response.status_code}: {_error_message(response)}",
                          response.status_code, _retry_after(response))
            continue
        if not 200 <= response.status_code < 300:
            # A bad request stays bad: report it at once with the server's own message.
            raise error(f"{url} answered HTTP {response.status_code}: "
                        f"{_error_message(response)}", url=url,
                        status=response.status_code, attempts=attempt + 1)
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type")
            last = _Retry(f"answered non-JSON ({kind}): {response.text[:120]!r}",
                          response.status_code)
    assert last is not None
    raise error(f"{url}: {last} (gave up after {attempts} attempt"
                f"{'s' if attempts > 1 else ''})", url=url, status=last.status,
                attempts=attempts, unreachable=last.unreachable)


def parse_completion(body: object, url: str = "") -> str:
    """The text of the first choice of a completions response."""
    try:
        text = body["choices"][0]["text"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise CompletionsError(f"{url} answered JSON without choices[0].text: "
                               f"{json.dumps(body)[:200]}", url=url) from None
    if not isinstance(text, str):
        raise CompletionsError(f"{url} answered a non-string choices[0].text", url=url)
    return text


def make_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    # Concurrent module calls share one connection pool; size it to the worker count.
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
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
