"""The one client of the node's HTTP RPC: the external miner (`potchain mine`), the
devnet and the simulation (sim/processes.py, sim/runner.py) all use it.

Built on urllib3's `PoolManager`: connections to the node are kept alive and
reused (a miner polling for work opens one, not one per request), every
request has a connect and a read timeout, and requests are retried only where
that is safe:

- a connection that cannot be opened (the node is starting, or restarting) is
  retried for any method: nothing reached the node;
- a GET (idempotent) is also retried when the connection breaks or times out
  while reading, and when the node answers 503 (busy), after its Retry-After;
- a POST is never sent twice: a submitted block may have been taken.

Retries wait `backoff * 2**(n-1)` seconds before the n-th one after the
first (at most `MAX_BACKOFF_SECONDS`). An answer with an error status, or a
node that stays unreachable, raises `RpcClientError` with the HTTP status (None
when there was no answer) and the server's reason (the `error` of its JSON
body, or the body's text).
"""

from __future__ import annotations

import json
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util import Retry, Timeout

DEFAULT_RETRIES = 5
"""Retries of one request (with the default backoff, about 12 s of waiting in all)."""
DEFAULT_BACKOFF_SECONDS = 0.5
"""The backoff factor: the n-th retry after the first waits backoff * 2**(n-1) seconds."""
MAX_BACKOFF_SECONDS = 5.0
"""The longest wait between two tries."""
CONNECT_TIMEOUT_SECONDS = 10.0
"""Longest wait for a connection to open (a request's timeout, if shorter)."""
MAX_REASON_CHARACTERS = 500
"""A server's reason is cut to this length in an error's message."""


class RpcClientError(Exception):
    """The node answered with an error status, or could not be reached."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status of the node's answer; None if there was none."""
        self.reason = reason
        """The server's reason for an error status (its JSON `error`, or the body's text)."""


class RpcClient:
    """JSON and binary requests to one node, over kept-alive connections (thread-safe)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_SECONDS,
        connections: int = 4,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RPC url: got {url!r}, want http://HOST:PORT")
        if timeout <= 0:
            raise ValueError(f"timeout: got {timeout}, want more than 0 seconds")
        if retries < 0:
            raise ValueError(f"retries: got {retries}, want 0 or more")
        if backoff < 0:
            raise ValueError(f"backoff: got {backoff}, want 0 or more seconds")
        if connections < 1:
            raise ValueError(f"connections: got {connections}, want at least 1")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=connections)
        """Kept-alive connections to the node (more than `connections` at once are opened and not kept)."""

    def close(self) -> None:
        """Close the kept-alive connections (the client opens new ones if used again)."""
        self.pool.clear()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        """GET a JSON document (any 2xx answer, 206 "syncing" included)."""
        return self._decode(path, self._request("GET", path, timeout=timeout))

    def get_bytes(self, path: str, timeout: float | None = None) -> bytes:
        return self._request("GET", path, timeout=timeout)

    def post_bytes(self, path: str, data: bytes, token: str | None = None, timeout: float | None = None) -> Any:
        """POST a binary body (a block) with the token (`token`, or the client's); the JSON answer."""
        answer = self._request("POST", path, data, "application/octet-stream", token, timeout)
        return self._decode(path, answer)

    def submit_commitment(self, encoded: bytes, token: str | None = None, timeout: float | None = None) -> Any:
        """POST an encoded update commitment to /v1/mining/commitments; the JSON answer (202: kept,
        200: already kept, and gossiped again). Another height than the one being decided is a 409."""
        return self.post_bytes("/v1/mining/commitments", encoded, token, timeout)

    def post_json(self, path: str, document: object, token: str | None = None, timeout: float | None = None) -> Any:
        """POST a JSON document with the token (`token`, or the client's); the JSON answer."""
        answer = self._request("POST", path, json.dumps(document).encode(), "application/json", token, timeout)
        return self._decode(path, answer)

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        if not path.startswith("/"):
            raise ValueError(f"RPC path: got {path!r}, want one starting with /")
        seconds = self.timeout if timeout is None else timeout
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        bearer = token if token is not None else self.token
        if method != "GET" and bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            response = self.pool.request(
                method,
                self.url + path,
                body=body,
                headers=headers,
                timeout=Timeout(connect=min(CONNECT_TIMEOUT_SECONDS, seconds), read=seconds),
                retries=self._retry(method),
                redirect=False,
            )
        except MaxRetryError as error:
            raise RpcClientError(f"{method} {self.url}{path}: cannot reach the node: {error.reason}") from None
        except HTTPError as error:
            raise RpcClientError(f"{method} {self.url}{path}: {error}") from None
        if response.status >= 300:
            reason = error_reason(response.data)
            raise RpcClientError(f"{method} {path}: HTTP {response.status}: {reason}", response.status, reason)
        return bytes(response.data)

    def _retry(self, method: str) -> Retry:
        """What is retried: opening a connection, always; reading and a 503, for GET only."""
        idempotent = method == "GET"
        return Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries if idempotent else 0,
            status=self.retries if idempotent else 0,
            other=0,
            redirect=0,
            allowed_methods=frozenset({"GET"}),
            status_forcelist=frozenset({503}),
            backoff_factor=self.backoff,
            backoff_max=MAX_BACKOFF_SECONDS,
            raise_on_status=False,
            respect_retry_after_header=True,
        )

    def _decode(self, path: str, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError as error:
            raise RpcClientError(f"{path}: the node's answer is not JSON ({error}): {data[:100]!r}") from None


def error_reason(body: bytes) -> str:
    """The server's reason in an error answer: its JSON `error`, else the body's text."""
    text = body.decode(errors="replace").strip()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        text = document["error"]
    if len(text) > MAX_REASON_CHARACTERS:
        text = text[:MAX_REASON_CHARACTERS] + "..."
    return text or "(no reason given)"
