"""A small client of the node's HTTP RPC, for the external miner and tools."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class RpcClientError(Exception):
    """The node answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RpcClient:
    """JSON and binary requests to one node."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if data is not None:
            request.add_header("Content-Type", "application/octet-stream")
            if self.token:
                request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as error:
            detail = error.read()
            try:
                message = json.loads(detail).get("error", detail.decode(errors="replace"))
            except ValueError:
                message = detail.decode(errors="replace")
            raise RpcClientError(f"{path}: HTTP {error.code}: {message}", error.code) from None
        except (urllib.error.URLError, OSError) as error:
            raise RpcClientError(f"{self.url}{path}: {error}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(path)

    def post_bytes(self, path: str, data: bytes) -> Any:
        return json.loads(self._request(path, data))
