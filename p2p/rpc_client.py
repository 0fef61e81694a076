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

`EventStream` reads a node's server-sent events (`GET /v1/events`) in a
background thread and reconnects (resuming from the last event id) when the
stream drops; `HeadWatch` wakes a waiter when any of several nodes decides a
height. Their users wait on events and poll the node only while a stream is
down.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
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
EVENT_READ_TIMEOUT_SECONDS = 45.0
"""An event stream silent this long is dead (a node sends a keep-alive comment every 15 s)."""
EVENT_RETRY_SECONDS = 1.0
"""Wait before reconnecting a dropped event stream."""
MAX_QUEUED_EVENTS = 4096
"""Events an `EventStream` holds for its reader; past it the oldest are dropped."""

log = logging.getLogger(__name__)


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


# --- Server-sent events ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerEvent:
    """One event of a node's stream."""

    id: int | None
    """Its id (None if it had none)."""
    topic: str
    """head, finalized, block, attestation, gap or subscribed (docs/node.md)."""
    data: Any
    """Its JSON data."""


def parse_event(block: str) -> ServerEvent | None:
    """One event of a text/event-stream (its lines, without the blank line after); None for a
    comment (a keep-alive) or an event without data."""
    event_id: int | None = None
    topic = "message"
    data: list[str] = []
    for line in block.splitlines():
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id" and value.isdigit():
            event_id = int(value)
        elif name == "event":
            topic = value
        elif name == "data":
            data.append(value)
    if not data:
        return None
    try:
        decoded = json.loads("\n".join(data))
    except ValueError:
        decoded = "\n".join(data)
    return ServerEvent(event_id, topic, decoded)


class EventStream:
    """A node's server-sent events of `topics`, read by a background thread (`start`, then
    `wait` for events; `close`). A stream that drops, or that cannot be opened, is opened again
    after `retry_seconds`, resuming from the last event id seen (the node sends what was missed,
    or a gap event). `connected` says whether the stream is open now: while it is not, a waiter
    polls the node. `wake`, if given, is set at every event (one event shared by several streams)."""

    def __init__(
        self,
        url: str,
        topics: Iterable[str] = ("head",),
        *,
        wake: threading.Event | None = None,
        retry_seconds: float = EVENT_RETRY_SECONDS,
        read_timeout: float = EVENT_READ_TIMEOUT_SECONDS,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RPC url: got {url!r}, want http://HOST:PORT")
        self.url = url.rstrip("/")
        self.topics = tuple(topics)
        if not self.topics:
            raise ValueError("EventStream topics: got none, want at least one")
        self.wake = wake
        self.retry_seconds = retry_seconds
        self.read_timeout = read_timeout
        self.last_id: int | None = None
        """The last event id received (sent as Last-Event-ID when reconnecting)."""
        self.connected = False
        """Whether the stream is open now."""
        self._events: deque[ServerEvent] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._arrived = threading.Condition()
        self._closed = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._pool = urllib3.PoolManager(num_pools=1, maxsize=1)
        self._thread = threading.Thread(target=self._run, name="rpc-events", daemon=True)

    def start(self) -> EventStream:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop reading (from any thread; idempotent)."""
        self._closed.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks the reading thread
            except Exception as error:  # a connection closing meanwhile
                log.debug("event stream shutdown: %s", error)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._pool.clear()

    def __enter__(self) -> EventStream:
        return self.start()

    def __exit__(self, *exception: object) -> None:
        self.close()

    def wait(self, timeout: float) -> list[ServerEvent]:
        """The events received since the last call, oldest first, waiting up to `timeout`
        seconds for the first; empty if none came."""
        with self._arrived:
            if not self._events:
                self._arrived.wait(timeout)
            events = list(self._events)
            self._events.clear()
            return events

    def _run(self) -> None:
        path = "/v1/events?topics=" + ",".join(self.topics)
        while not self._closed.is_set():
            headers = {"Accept": "text/event-stream"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = str(self.last_id)
            try:
                response = self._pool.request(
                    "GET", self.url + path, headers=headers, preload_content=False, retries=False, redirect=False,
                    timeout=Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=self.read_timeout),
                )  # fmt: skip
                self._response = response
                try:
                    if response.status != 200:
                        log.info("event stream %s: HTTP %d: %s", self.url, response.status, error_reason(response.data))
                    elif not self._closed.is_set():
                        self._read(response)
                finally:
                    self.connected = False
                    response.release_conn()
            except Exception as error:  # refused, reset, timed out: reconnect
                log.debug("event stream %s: %s", self.url, error)
            self._closed.wait(self.retry_seconds)

    def _read(self, response: urllib3.BaseHTTPResponse) -> None:
        self.connected = True
        pending = b""
        while not self._closed.is_set():
            chunk = response.read1(1 << 16)
            if not chunk:
                return  # the node closed the stream
            pending = (pending + chunk).replace(b"\r\n", b"\n")
            *blocks, pending = pending.split(b"\n\n")
            events = [e for e in (parse_event(b.decode(errors="replace")) for b in blocks) if e is not None]
            if events:
                self._deliver(events)

    def _deliver(self, events: list[ServerEvent]) -> None:
        with self._arrived:
            for event in events:
                if event.id is not None:
                    self.last_id = event.id
                self._events.append(event)
            self._arrived.notify_all()
        if self.wake is not None:
            self.wake.set()


class HeadWatch:
    """Wakes a waiter when any of several nodes decides a height (their `head` event streams),
    for the devnet and the simulation: `watch` the nodes' RPC urls (streams open and close to
    match; a restarted node has a new url), then `wait`."""

    def __init__(self, topics: Iterable[str] = ("head",)) -> None:
        self.topics = tuple(topics)
        self._woken = threading.Event()
        self._streams: dict[str, EventStream] = {}

    def watch(self, urls: Iterable[str]) -> None:
        """Keep a stream open to exactly these nodes."""
        wanted = set(urls)
        for url in set(self._streams) - wanted:
            self._streams.pop(url).close()
        for url in wanted - set(self._streams):
            self._streams[url] = EventStream(url, self.topics, wake=self._woken).start()

    @property
    def connected(self) -> bool:
        """Whether every watched node's stream is open (else its waiters poll)."""
        return bool(self._streams) and all(stream.connected for stream in self._streams.values())

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for an event from any watched node; whether one came."""
        woken = self._woken.wait(timeout)
        self._woken.clear()
        for stream in self._streams.values():
            stream.wait(0)  # the events themselves are not kept
        return woken

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()

    def __enter__(self) -> HeadWatch:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()
