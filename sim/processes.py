"""Real node processes on loopback: start, query over the RPC, stop.

`NodeProcess` runs `potchain node` as a child process with its own data
directory and log file; it reads the node's `node.json` (peer address and
RPC URL, written once the node listens) and talks to it over HTTP with the
RPC client (p2p/rpc_client.py: kept-alive connections, a short retry of a
connection refused). The devnet and the functional tests drive networks
with these.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2p.rpc_client import RpcClient, RpcClientError

ROOT = Path(__file__).resolve().parent.parent
RPC_RETRIES = 2
"""Retries of a request to a node process (a killed node must not hold the simulation up)."""
RPC_BACKOFF_SECONDS = 0.2


class NodeProcessError(Exception):
    """A node process failed to start, answer or stop."""


@dataclass
class NodeProcess:
    """One `potchain node` child process."""

    name: str
    datadir: Path
    arguments: list[str]
    """Flags after `potchain node --datadir DATADIR`."""
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """node.json: peer_id, addresses, rpc, pid."""
    terminated: bool = False
    _client: RpcClient | None = field(default=None, repr=False)
    """The RPC client of the node's current run (`client`)."""

    @property
    def log_path(self) -> Path:
        return self.datadir / "node.log"

    def start(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        (self.datadir / "node.json").unlink(missing_ok=True)
        environment = dict(os.environ)
        environment.pop("ATEN_CPU_CAPABILITY", None)
        environment.update(self.environment)
        command = [sys.executable, "-c", "import sys, node; sys.exit(node.main())", "node",
                   "--datadir", str(self.datadir), *self.arguments]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=log)
        self.info, self.terminated = {}, False

    def wait_started(self, timeout: float = 120) -> dict[str, Any]:
        """Wait for node.json from this run (the node is listening and serving the RPC)."""
        deadline = time.monotonic() + timeout
        path = self.datadir / "node.json"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NodeProcessError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            if path.exists():
                info: dict[str, Any] = json.loads(path.read_text())
                if self.process is not None and info.get("pid") == self.process.pid:
                    self.info = info
                    return info
            time.sleep(0.1)
        raise NodeProcessError(f"{self.name} did not start within {timeout} s; see {self.log_path}")

    @property
    def rpc(self) -> str:
        return str(self.info["rpc"])

    @property
    def address(self) -> str:
        return str(self.info["addresses"][0])

    @property
    def client(self) -> RpcClient:
        """The RPC client of this run of the node (a restarted node has another port)."""
        if self._client is None or self._client.url != self.rpc:
            if self._client is not None:
                self._client.close()
            self._client = RpcClient(self.rpc, retries=RPC_RETRIES, backoff=RPC_BACKOFF_SECONDS)
        return self._client

    def get(self, path: str, timeout: float = 10) -> Any:
        """GET a JSON document from the node's RPC (a 206 "syncing" answer too)."""
        try:
            return self.client.get_json(path, timeout=timeout)
        except RpcClientError as error:
            raise NodeProcessError(f"{self.name} GET {path}: {error}") from None

    def post_json(self, path: str, document: object, token: str, timeout: float = 10) -> Any:
        """POST a JSON document to the node's RPC with `token`; its JSON answer."""
        try:
            return self.client.post_json(path, document, token=token, timeout=timeout)
        except RpcClientError as error:
            raise NodeProcessError(f"{self.name} POST {path}: {error}") from None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM once (the node stops cleanly)."""
        if self.process is not None and self.process.poll() is None and not self.terminated:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; SIGKILL only if it does not stop in time. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise NodeProcessError(f"{self.name} did not stop within {timeout} s; killed") from None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
