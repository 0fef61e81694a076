"""Decisions per minute of one node with and without a client polling its RPC.

    python bench/rpc_load.py [--seconds 90] [--minutes M]

Starts one `potchain node` process with the four devnet validator keys and
`--mine` (docs/node.md, a single node), waits for its first decided height,
then counts the heights it decides in `--seconds` without any RPC client,
and in as many seconds again with a client polling six read endpoints
(status, head block, finality, model, weights, mining work) every 0.2 s.
Prints one JSON line: decisions per minute both ways, their ratio (target:
at least 0.5, polling slows decisions by at most 2x), the polled requests,
their errors and the slowest answer.

`--minutes M` then goes on polling for M minutes and reports each minute's
decisions: the node must stay up and keep deciding (`keeps_finalizing`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from sim.processes import NodeProcess

POLL_SECONDS = 0.2
"""The polling client's period."""
MINER = "ab" * 32
"""A miner key for the work endpoint (any 32 bytes)."""
ENDPOINTS = [
    "/v1/status",
    "/v1/blocks/head",
    "/v1/finality",
    "/v1/model",
    "/v1/model/weights",
    f"/v1/mining/work?miner={MINER}",
]
"""The six read endpoints polled."""


class Poller:
    """A client fetching every endpoint, one after another, every POLL_SECONDS, on its own thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests = 0
        self.errors: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            for path in ENDPOINTS:
                begun = time.monotonic()
                try:
                    with urllib.request.urlopen(self.url + path, timeout=30) as response:
                        response.read()
                except (urllib.error.URLError, OSError) as error:
                    self.errors.append(f"{path}: {error}")
                self.requests += 1
                self.slowest = max(self.slowest, time.monotonic() - begun)
            self._stop.wait(max(0.0, POLL_SECONDS - (time.monotonic() - started)))


def height(process: NodeProcess) -> int:
    return int(process.get("/v1/status", timeout=60)["head_height"])


def decisions_per_minute(process: NodeProcess, seconds: float) -> tuple[int, float]:
    start = height(process)
    time.sleep(seconds)
    decided = height(process) - start
    return decided, round(decided * 60 / seconds, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90, help="each phase's length (default 90)")
    parser.add_argument("--minutes", type=float, default=0, help="then poll this many minutes (a long run)")
    parser.add_argument("--threads", type=int, default=1, help="the node's torch threads (default 1)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.minutes < 0:
        parser.error(f"--seconds must be > 0 and --minutes >= 0, got {args.seconds} and {args.minutes}")
    directory = Path(tempfile.mkdtemp(prefix="rpc-load-"))
    validators = [flag for i in range(4) for flag in ("--validator-key", f"devnet:validator-{i}")]
    flags = ["--rpc-port", "0", "--threads", str(args.threads), "--mine", "--miner-key", "devnet:miner-0"]
    process = NodeProcess("node", directory / "node", [*validators, *flags])
    process.start()
    result: dict[str, object] = {"datadir": str(directory / "node"), "seconds": args.seconds}
    try:
        process.wait_started()
        deadline = time.monotonic() + 300
        while height(process) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("no height decided in 300 s")
            time.sleep(1)
        quiet, quiet_rate = decisions_per_minute(process, args.seconds)
        poller = Poller(process.rpc)
        poller.start()
        try:
            polled, polled_rate = decisions_per_minute(process, args.seconds)
            minutes = []
            for _ in range(int(args.minutes)):
                minutes.append(decisions_per_minute(process, 60)[0])
        finally:
            poller.stop()
        result |= {
            "decisions_quiet": quiet,
            "decisions_per_minute_quiet": quiet_rate,
            "decisions_polled": polled,
            "decisions_per_minute_polled": polled_rate,
            "ratio": round(polled_rate / quiet_rate, 3) if quiet_rate else None,
            "polled_requests": poller.requests,
            "polled_errors": len(poller.errors),
            "first_errors": poller.errors[:3],
            "slowest_answer_seconds": round(poller.slowest, 3),
        }
        if args.minutes:
            result |= {
                "decisions_each_minute": minutes,
                "keeps_finalizing": all(count > 0 for count in minutes) and process.is_running(),
            }
    finally:
        result["exit_code"] = process.stop()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
