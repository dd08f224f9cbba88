"""The one way the end-to-end tests call the Prefect server's REST API: as Prefect's own client
does, a 429, 502 or 503 is retried (the server answers 503 for errors it calls retryable, such as
its SQLite database being locked on a busy machine), with a short backoff and a bounded total.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

RETRYABLE = {429, 502, 503}
RETRY_DEADLINE = 30.0  # seconds, for all the attempts of one call
FIRST_DELAY, MAX_DELAY = 0.25, 2.0


class PrefectApi:
    """A REST client of one Prefect server's API (``base_url`` ends in /api); a context manager."""

    def __init__(self, base_url: str) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=30)

    def __enter__(self) -> PrefectApi:
        return self

    def __exit__(self, *exc_info) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """Send one request, again while the server answers 429/502/503; return the last response.

        Raises httpx.TransportError when the server cannot be reached (not retried: the server
        said nothing about it, and a POST that timed out may have been taken).
        """
        deadline = time.monotonic() + RETRY_DEADLINE
        delay = FIRST_DELAY
        while True:
            response = self._http.request(method, path, json=body)
            if response.status_code not in RETRYABLE:
                return response
            wait = _retry_after(response) or delay
            if time.monotonic() + wait > deadline:
                return response
            time.sleep(wait)
            delay = min(delay * 2, MAX_DELAY)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send the request (see ``request``); return its JSON, or fail naming the call and answer."""
        response = self.request(method, path, body)
        assert response.is_success, f"{method} {path}: HTTP {response.status_code} {response.text}"
        return response.json()

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body)


def _retry_after(response: httpx.Response) -> float | None:
    """Return the seconds a numeric Retry-After header asks for, or None."""
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
