"""The agent's side of the raw-search protocol: POST q and n, form-encoded, to exactly the URL.

Unlike ParlAI's client (no timeout, endless retries on non-200: ParlAI #4745) a search here
has a timeout and a bounded retry count, and any failure is a SearchError that the agent turns
into the contextual path.
"""

from __future__ import annotations

from agents.client import RetryPolicy, ServiceError, make_session, normalise_url, request_json
from agents.search.protocol import Document, parse_search_response


class SearchError(ServiceError):
    pass


class SearchClient:
    def __init__(self, url: str, policy: RetryPolicy = RetryPolicy(timeout_s=10.0,
                                                                   max_retries=1),
                 pool_size: int = 2):
        self.url = normalise_url(url)  # no path appended: ParlAI posts to the URL as given
        self.policy = policy
        self._session = make_session(pool_size)

    def search(self, query: str, n: int = 5) -> list[Document]:
        body = request_json(self._session, "POST", self.url, self.policy, error=SearchError,
                            data={"q": query, "n": str(n)})
        try:
            return parse_search_response(body)[:n]
        except ValueError as exc:
            raise SearchError(f"{self.url} answered a malformed search result (unexpected shape: "
                              f"{exc})",
                              url=self.url) from None

    def close(self) -> None:
        self._session.close()
