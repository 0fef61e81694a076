"""The RPC client (p2p/rpc_client.py): kept-alive connections, retries where they are
safe (a node that comes up late, a GET whose connection broke, a busy node's 503),
never a POST sent twice, and errors that carry the status and the server's reason.

The server here is a small scripted HTTP/1.1 server on loopback: each test says
what it answers and counts the requests and connections it saw."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from p2p.rpc_client import RpcClient, RpcClientError


@dataclass
class Answer:
    """What the scripted server does with one request."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    """Close the connection without answering."""


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    body: bytes
    authorization: str | None
    connection: int
    """The number of the connection it came on (1 for the first)."""


class ScriptedServer:
    """Answers each request with `script(method, path, count)`, count starting at 1 per method."""

    def __init__(self, script: Callable[[str, str, int], Answer], port: int = 0) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.connections = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.connections += 1
                    self.number = server.connections

            def log_message(self, format: str, *args: object) -> None:
                pass

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with server.lock:
                    count = 1 + sum(seen.method == self.command for seen in server.seen)
                    server.seen.append(
                        Seen(self.command, self.path, body, self.headers.get("Authorization"), self.number)
                    )
                answer = server.script(self.command, self.path, count)
                if answer.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = answer  # noqa: N815
            do_POST = answer  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serving(script: Callable[[str, str, int], Answer]) -> Iterator[ScriptedServer]:
    server = ScriptedServer(script)
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ok(method: str, path: str, count: int) -> Answer:
    return Answer(body=json.dumps({"method": method, "path": path, "count": count}).encode())


def test_a_node_that_comes_up_late_is_waited_for() -> None:
    port = free_port()
    servers: list[ScriptedServer] = []
    starter = threading.Timer(1.0, lambda: servers.append(ScriptedServer(ok, port)))
    started = time.monotonic()
    starter.start()
    try:
        client = RpcClient(f"http://127.0.0.1:{port}", retries=6, backoff=0.2)
        assert client.get_json("/v1/status") == {"method": "GET", "path": "/v1/status", "count": 1}
        assert time.monotonic() - started >= 1.0
        assert client.post_json("/v1/admin/x", {"a": 1}, token="t") == {
            "method": "POST",
            "path": "/v1/admin/x",
            "count": 1,
        }
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_a_node_that_never_comes_up_is_an_error_without_a_status() -> None:
    client = RpcClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.05)
    with pytest.raises(RpcClientError, match="cannot reach the node") as raised:
        client.get_json("/v1/status")
    assert raised.value.status is None and raised.value.reason is None
    with pytest.raises(RpcClientError, match="cannot reach the node"):
        client.post_bytes("/v1/mining/submit", b"block")


def test_connections_are_kept_alive_and_the_token_goes_with_posts_only() -> None:
    with serving(ok) as server:
        client = RpcClient(server.url, token="secret")
        for _ in range(5):
            client.get_json("/v1/status")
        assert (
            client.get_bytes("/v1/blocks/1?format=raw")
            == b'{"method": "GET", "path": "/v1/blocks/1?format=raw", "count": 6}'
        )
        client.post_bytes("/v1/mining/submit", b"\x01\x02")
        client.post_json("/v1/admin/link-delay", {"seconds": 0.1}, token="admin")
        assert server.connections == 1, "a new connection per request"
        assert [seen.authorization for seen in server.seen] == [None] * 6 + ["Bearer secret", "Bearer admin"]
        assert server.seen[6].body == b"\x01\x02" and json.loads(server.seen[7].body) == {"seconds": 0.1}


def test_a_get_whose_connection_breaks_is_retried_a_post_never() -> None:
    def script(method: str, path: str, count: int) -> Answer:
        return Answer(drop=True) if count == 1 else ok(method, path, count)

    with serving(script) as server:
        client = RpcClient(server.url, retries=3, backoff=0.05)
        assert client.get_json("/v1/mining/work")["count"] == 2
        with pytest.raises(RpcClientError, match="POST") as raised:
            client.post_bytes("/v1/mining/submit", b"block")
        assert raised.value.status is None
        assert [seen.method for seen in server.seen] == ["GET", "GET", "POST"], "a POST was sent twice"


def test_a_busy_node_is_asked_again_after_its_retry_after_for_a_get_only() -> None:
    def script(method: str, path: str, count: int) -> Answer:
        if count == 1:
            return Answer(503, b'{"error": "too many requests at once"}', {"Retry-After": "1"})
        return ok(method, path, count)

    with serving(script) as server:
        client = RpcClient(server.url, retries=3, backoff=0.05)
        started = time.monotonic()
        assert client.get_json("/v1/status")["count"] == 2
        assert time.monotonic() - started >= 1.0, "the Retry-After was not waited for"
        with pytest.raises(RpcClientError) as raised:
            client.post_bytes("/v1/mining/submit", b"block")
        assert raised.value.status == 503 and raised.value.reason == "too many requests at once"
        assert [seen.method for seen in server.seen] == ["GET", "GET", "POST"]


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, b'{"error": "height: got -1, want 0 or more"}', "height: got -1, want 0 or more"),
        (401, b'{"error": "missing or wrong token"}', "missing or wrong token"),
        (422, b'{"error": "stale: built on height 3"}', "stale: built on height 3"),
        (500, b"Internal Server Error", "Internal Server Error"),
        (404, b"", "(no reason given)"),
        (409, b'{"detail": "not the usual shape"}', '{"detail": "not the usual shape"}'),
    ],
)
def test_an_error_answer_carries_its_status_and_the_servers_reason(status: int, body: bytes, reason: str) -> None:
    with serving(lambda method, path, count: Answer(status, body)) as server:
        client = RpcClient(server.url, retries=3, backoff=0.05)
        for call in (lambda: client.get_json("/v1/blocks/x"), lambda: client.post_bytes("/v1/mining/submit", b"b")):
            with pytest.raises(RpcClientError) as raised:
                call()
            assert (raised.value.status, raised.value.reason) == (status, reason)
            assert f"HTTP {status}: {reason}" in str(raised.value)
        assert len(server.seen) == 2, "an error answer was asked again"


def test_an_answer_that_is_not_json_and_bad_arguments_are_clear_errors() -> None:
    with serving(lambda method, path, count: Answer(200, b"<html>")) as server:
        client = RpcClient(server.url)
        with pytest.raises(RpcClientError, match="/v1/status: the node's answer is not JSON"):
            client.get_json("/v1/status")
        assert client.get_bytes("/v1/status") == b"<html>"
        with pytest.raises(ValueError, match="RPC path: got 'v1/status', want one starting with /"):
            client.get_json("v1/status")
    with pytest.raises(ValueError, match="RPC url: got 'localhost:8645', want http://HOST:PORT"):
        RpcClient("localhost:8645")
    with pytest.raises(ValueError, match="timeout: got 0, want more than 0 seconds"):
        RpcClient("http://127.0.0.1:1", timeout=0)


def test_a_206_syncing_answer_is_an_answer() -> None:
    with serving(lambda method, path, count: Answer(206, b'{"status": "syncing"}')) as server:
        assert RpcClient(server.url).get_json("/v1/status") == {"status": "syncing"}
