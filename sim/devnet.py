"""A local network of separate node processes on loopback: `potchain devnet`.

Node 0 mines; the genesis validators' devnet keys are dealt round-robin to
the nodes; node i bootstraps from nodes 0..i-1. The nodes decide one block
per height by voting rounds, final at once (a node's finalized height is its
decided head). With `finalize`, it waits until every node has decided at
least `finalize` heights and they hold the same block at their lowest common
head (they keep deciding meanwhile, so their heads may differ by a height),
collects each node's view over the RPC, stops them all cleanly and writes
`summary.json`; without it, it runs until interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2p.rpc_client import HeadWatch
from sim.processes import NodeProcess, NodeProcessError

POLL_SECONDS = 0.5
"""Seconds between looks at the nodes' status while an event stream is down."""
EVENT_WAIT_SECONDS = 10.0
"""With every node's event stream open, the status is read at each decided head, or after this long."""


@dataclass(frozen=True)
class DevnetConfig:
    genesis: Path
    nodes: int
    out: Path
    finalize: int | None
    """Stop once every node has decided this height (None: run until interrupted)."""
    validators: int
    """Genesis validators (their devnet keys are validator-0, validator-1, ...)."""
    miners: int = 1
    """Nodes 0..miners-1 mine."""
    steps: int | None = None
    threads: int = 1
    timeout: float = 900
    """Seconds to wait for `finalize` before giving up."""


def node_arguments(config: DevnetConfig, index: int, bootstrap: list[str]) -> list[str]:
    arguments = ["--genesis", str(config.genesis), "--rpc-port", "0", "--threads", str(config.threads)]
    for validator in range(index, config.validators, config.nodes):
        arguments += ["--validator-key", f"devnet:validator-{validator}"]
    if index < config.miners:
        arguments += ["--mine", "--miner-key", f"devnet:miner-{index}"]
        if config.steps is not None:
            arguments += ["--steps", str(config.steps)]
    for address in bootstrap:
        arguments += ["--bootstrap", address]
    return arguments


def start_devnet(config: DevnetConfig, processes: list[NodeProcess]) -> None:
    """Start the nodes one by one, each bootstrapping from those before it; each is added to
    `processes` as soon as it runs, so that the caller stops every node started, even when
    this is interrupted (Ctrl-C, SIGTERM) half-way."""
    for index in range(config.nodes):
        bootstrap = [p.address for p in processes]
        process = NodeProcess(f"node{index}", config.out / f"node{index}", node_arguments(config, index, bootstrap))
        process.start()
        processes.append(process)
        info = process.wait_started()
        print(f"[devnet] node{index}: rpc {info['rpc']}  peer {info['peer_id']}", file=sys.stderr, flush=True)


def stop_all(processes: list[NodeProcess]) -> dict[str, int]:
    codes = {}
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            codes[process.name] = process.stop()
        except NodeProcessError as error:
            print(f"[devnet] {error}", file=sys.stderr)
            codes[process.name] = -9
    return codes


def collect(processes: list[NodeProcess]) -> dict[str, Any]:
    """Each node's head (decided, so final), the block it holds at the nodes' lowest common head,
    its peers, and the block propagation times it saw."""
    views = []
    for process in processes:
        status = process.get("/v1/status")
        peers = process.get("/v1/peers")["peers"]
        views.append((process, status, sum(1 for p in peers if p["connected"])))
    reference = views[0][0]
    head_height = min(status["head_height"] for _, status, _ in views)
    received: dict[str, dict[str, float]] = {}
    for height in range(1, head_height + 1):
        block_hash = reference.get(f"/v1/blocks/{height}")["hash"]
        received[block_hash] = {}
        for process, _, _ in views:
            block = process.get(f"/v1/blocks/{block_hash}")
            if block.get("received_at") is not None:
                received[block_hash][process.name] = float(block["received_at"])
    common = {process.name: process.get(f"/v1/blocks/{head_height}")["hash"] for process, _, _ in views}
    nodes = []
    for process, status, connected in views:
        delays = [
            round(times[process.name] - min(times.values()), 4)
            for times in received.values()
            if process.name in times and len(times) > 1
        ]
        nodes.append({
            "name": process.name,
            "rpc": process.rpc,
            "peer_id": process.info["peer_id"],
            "head_height": status["head_height"],
            "head_hash": status["head_hash"],
            "finalized_height": status["finalized_height"],
            "finalized_hash": status["finalized_hash"],
            "common_height": head_height,
            "common_hash": common[process.name],
            "state_root": status.get("state_root"),
            "validation_loss": status["validation_loss"],
            "test_loss": status["test_loss"],
            "peer_count": connected,
            "propagation_seconds": delays,
        })  # fmt: skip
    all_delays = sorted(d for node in nodes for d in node["propagation_seconds"] if d > 0)
    return {
        "nodes": nodes,
        "propagation_seconds_median": all_delays[len(all_delays) // 2] if all_delays else None,
        "propagation_seconds_max": all_delays[-1] if all_delays else None,
    }


def wait_finalized(processes: list[NodeProcess], height: int, timeout: float) -> tuple[str, int]:
    """Wait until every node decided at least `height` and they all hold one block at their
    lowest common head; (that block's hash, its height). Woken by the nodes' head events; polls
    while a stream is down."""
    with HeadWatch() as heads:
        heads.watch(p.rpc for p in processes)
        return _wait_finalized(processes, height, timeout, heads)


def _wait_finalized(processes: list[NodeProcess], height: int, timeout: float, heads: HeadWatch) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        statuses = []
        for process in processes:
            if not process.is_running():
                raise NodeProcessError(f"{process.name} exited; see {process.log_path}")
            try:
                statuses.append(process.get("/v1/status"))
            except NodeProcessError:
                statuses.append(None)
        line = " ".join(
            f"{p.name}:{s['finalized_height']}" if s else f"{p.name}:?"
            for p, s in zip(processes, statuses, strict=True)
        )
        if line != last:
            print(f"[devnet] decided {line}", file=sys.stderr, flush=True)
            last = line
        if all(statuses):
            common = min(s["finalized_height"] for s in statuses if s)
            if common >= height:
                try:
                    hashes = {p.get(f"/v1/blocks/{common}")["hash"] for p in processes}
                except NodeProcessError:
                    hashes = set()
                if len(hashes) == 1:
                    return hashes.pop(), common
        heads.wait(EVENT_WAIT_SECONDS if heads.connected else POLL_SECONDS)
    raise NodeProcessError(f"the nodes did not agree on a decided block at height >= {height} in {timeout} s")


def run_devnet(config: DevnetConfig) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    processes: list[NodeProcess] = []
    summary: dict[str, Any] = {"nodes_requested": config.nodes}
    try:
        start_devnet(config, processes)
        if config.finalize is None:
            print("[devnet] running; Ctrl-C stops every node", file=sys.stderr, flush=True)
            while all(p.is_running() for p in processes):
                time.sleep(1)
            raise NodeProcessError("a node exited; see its node.log")
        finalized_hash, height = wait_finalized(processes, config.finalize, config.timeout)
        summary.update(collect(processes))
        summary.update({"finalized_hash": finalized_hash, "finalized_height": height, "agree": True})
    finally:
        codes = stop_all(processes)
        summary["exit_codes"] = codes
        summary["seconds"] = round(time.monotonic() - started, 1)
        (config.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if any(codes.values()):
        raise NodeProcessError(f"nodes did not stop cleanly: {codes}")
    return summary
