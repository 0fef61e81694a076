"""The scenario runner: real node processes, a fault timeline, and what happened.

`run_scenario` starts the scenario's nodes as `potchain node` processes on
loopback (real libp2p, real LevelDB in the output directory), applies the
timeline (crash = SIGKILL, restart, partition and heal through each node's
blocked-peer list, late joins), waits until every honest node has finalized
the target height and they agree, collects everything over the RPC, stops
the nodes cleanly, re-validates every honest node's stored chain from
genesis, trains the centralized baseline, and returns the report's data.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consensus.genesis import Genesis
from sim.processes import NodeProcess, NodeProcessError
from sim.scenario import Event, NodeSpec, Scenario


def say(message: str) -> None:
    print(f"[sim] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """A scenario in progress."""

    scenario: Scenario
    out: Path
    genesis_path: Path
    processes: dict[int, NodeProcess] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """Each event as applied: seconds, action, nodes."""
    crashed: set[int] = field(default_factory=set)
    """Nodes this run killed on purpose (and has not restarted)."""
    unexpected_exits: dict[int, int] = field(default_factory=dict)
    """Nodes that exited without being told to, with their exit codes."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    addresses: dict[int, str] = field(default_factory=dict)
    """Each node's full multiaddr (chosen before its first start)."""
    clock_zero: float = 0.0
    """run.elapsed when every node that starts at 0 was up: event times count from here."""
    starts: dict[str, list[float]] = field(default_factory=dict)
    """Wall-clock times each node was (re)started: blocks it fetched by syncing after a start did not
    propagate to it, so the report leaves them out of the propagation times."""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def spec(self, index: int) -> NodeSpec:
        return self.scenario.nodes[index]

    def running(self) -> list[NodeProcess]:
        return [p for i, p in sorted(self.processes.items()) if p.is_running() and i not in self.crashed]

    def address(self, index: int) -> str:
        """Node `index`'s full multiaddr, fixed before it starts: its key and port are chosen here."""
        from libp2p.peer.id import ID

        from p2p.host import load_or_create_node_key

        if index not in self.addresses:
            datadir = self.out / self.spec(index).name
            datadir.mkdir(parents=True, exist_ok=True)
            key_pair = load_or_create_node_key(datadir / "node_key")
            self.addresses[index] = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{ID.from_pubkey(key_pair.public_key)}"
        return self.addresses[index]

    def arguments(self, spec: NodeSpec) -> list[str]:
        scenario = self.scenario
        listen = self.address(spec.index).rsplit("/p2p/", 1)[0]
        flags = ["--genesis", str(self.genesis_path), "--rpc-port", "0", "--threads", "1", "--listen", listen]
        flags += ["--steps", str(scenario.steps), "--log-level", "info"]
        for validator in spec.validators:
            flags += ["--validator-key", f"devnet:validator-{validator}"]
        if spec.mine:
            flags += ["--mine", "--miner-key", f"devnet:sim-{scenario.seed}-miner-{spec.index}"]
        if spec.adversary:
            flags += ["--adversary", spec.adversary]
        for other in self.addresses:
            if other != spec.index:
                flags += ["--bootstrap", self.address(other)]
        return flags

    def start_nodes(self, indices: list[int]) -> None:
        """Start nodes at once (their addresses are known in advance), then wait for each."""
        for index in indices:
            self.address(index)
        for index in indices:
            spec = self.spec(index)
            process = self.processes.get(index)
            if process is None:
                process = NodeProcess(spec.name, self.out / spec.name, [])
                self.processes[index] = process
            process.arguments = self.arguments(spec)
            self.starts.setdefault(spec.name, []).append(time.time())
            process.start()
        for index in indices:
            spec = self.spec(index)
            self.processes[index].wait_started()
            self.crashed.discard(index)
            say(f"{self.elapsed:6.1f}s started {spec.name}{' (' + spec.adversary + ')' if spec.adversary else ''}")

    def apply(self, event: Event) -> None:
        say(f"{self.elapsed:6.1f}s {event.action} {list(event.nodes) or [list(g) for g in event.groups]}")
        if event.action == "crash":
            for index in event.nodes:
                self.processes[index].kill()
                self.crashed.add(index)
        elif event.action == "restart":
            self.start_nodes(list(event.nodes))
        elif event.action == "latency":
            for index in event.nodes:
                try:
                    post_json(self.processes[index], "/v1/admin/link-delay", {"seconds": event.ms / 1000})
                except OSError as error:
                    say(f"{self.elapsed:6.1f}s latency: {self.processes[index].name} did not answer: {error}")
        elif event.action in ("partition", "heal"):
            peer_ids = {i: p.info["peer_id"] for i, p in self.processes.items()}
            group_of = {i: g for g, members in enumerate(event.groups) for i in members}
            for index, process in self.processes.items():
                if index in self.crashed or not process.is_running():
                    continue
                blocked = []
                if event.action == "partition":
                    blocked = [peer_ids[j] for j in peer_ids if group_of.get(j, -1) != group_of.get(index, -2)]
                try:
                    post_json(process, "/v1/admin/blocked-peers", {"peers": blocked})
                except OSError as error:  # a node that is down misses the partition; it is reported
                    say(f"{self.elapsed:6.1f}s {event.action}: {process.name} did not answer: {error}")
        self.timeline.append({
            "seconds": round(self.elapsed, 1), "action": event.action,
            "nodes": list(event.nodes), "groups": [list(g) for g in event.groups], "ms": event.ms,
        })  # fmt: skip

    def check_exits(self) -> None:
        for index, process in self.processes.items():
            if index not in self.crashed and process.process is not None:
                code = process.process.poll()
                if code is not None and index not in self.unexpected_exits:
                    self.unexpected_exits[index] = code
                    say(f"{self.elapsed:6.1f}s {process.name} exited unexpectedly with {code}; see {process.log_path}")


def free_port() -> int:
    """A TCP port nothing listens on now (the node binds it a moment later)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post_json(process: NodeProcess, path: str, document: object) -> Any:
    token = (process.datadir / "rpc_token").read_text().strip()
    request = urllib.request.Request(process.rpc + path, data=json.dumps(document).encode(), method="POST")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def honest_statuses(run: Run) -> dict[int, dict[str, Any] | None]:
    statuses: dict[int, dict[str, Any] | None] = {}
    for spec in run.scenario.honest_nodes:
        process = run.processes.get(spec.index)
        if process is None or spec.index in run.crashed or not process.is_running():
            continue
        try:
            statuses[spec.index] = process.get("/v1/status")
        except NodeProcessError:
            statuses[spec.index] = None
    return statuses


def drive(run: Run) -> None:
    """Start the nodes, apply the timeline, and return once the honest nodes agree on the target."""
    scenario = run.scenario
    pending_events = list(scenario.events)
    joiners = sorted((spec for spec in scenario.nodes), key=lambda s: (s.join_at, s.index))
    for spec in joiners:
        run.address(spec.index)  # every node's address is known before any starts
    run.start_nodes([s.index for s in joiners if s.join_at == 0])
    run.clock_zero = run.elapsed
    waiting = [s for s in joiners if s.join_at > 0]
    last_line = ""
    deadline = scenario.timeout
    while run.elapsed < deadline + run.clock_zero:
        clock = run.elapsed - run.clock_zero
        while pending_events and pending_events[0].at <= clock:
            run.apply(pending_events.pop(0))
        while waiting and waiting[0].join_at <= clock:
            run.start_nodes([waiting.pop(0).index])
        run.check_exits()
        statuses = honest_statuses(run)
        for index, status in statuses.items():
            if status is not None:
                sample = {"seconds": round(run.elapsed, 2), "node": index}
                run.samples.append(sample | {k: status[k] for k in ("head_height", "finalized_height")})
        line = " ".join(
            f"n{i}:{s['head_height']}/{s['finalized_height']}" if s else f"n{i}:?" for i, s in statuses.items()
        )
        if line != last_line:
            say(f"{run.elapsed:6.1f}s head/finalized {line}")
            last_line = line
        everyone = len(statuses) == len(scenario.honest_nodes) and all(statuses.values())
        if everyone and not pending_events and not waiting:
            hashes = {s["finalized_hash"] for s in statuses.values() if s}
            heights = [s["finalized_height"] for s in statuses.values() if s]
            if len(hashes) == 1 and min(heights) >= scenario.finalize:
                return
        time.sleep(0.5)
    raise NodeProcessError(f"the honest nodes did not agree on finalized height >= {scenario.finalize} "
                           f"within {deadline:.0f} s")  # fmt: skip


def collect_chain(reference: NodeProcess, processes: list[NodeProcess], up_to: int) -> list[dict[str, Any]]:
    """Canonical blocks 1..up_to from the reference node, with each node's arrival time and,
    for validation blocks, the losses of the model after them."""
    blocks = []
    for height in range(1, up_to + 1):
        block = reference.get(f"/v1/blocks/{height}")
        arrivals = {}
        for process in processes:
            try:
                seen = process.get(f"/v1/blocks/{block['hash']}")
            except NodeProcessError:
                continue
            if seen.get("received_at") is not None:
                arrivals[process.name] = float(seen["received_at"])
        entry = {"height": height, "hash": block["hash"], "kind": block["kind"], "timestamp": block["timestamp"],
                 "proposer": block["proposer"], "arrivals": arrivals, "body": block["body"]}  # fmt: skip
        if block["kind"] == "validation":
            model = reference.get(f"/v1/model?height={height}")
            entry["validation_loss"], entry["test_loss"] = model["validation_loss"], model["test_loss"]
        blocks.append(entry)
    return blocks


def report_losses(genesis: Genesis, genesis_path: Path, weights: Any) -> tuple[float, float]:
    """(validation, test) nats per token on the report batches (seed 0), as the RPC reports them."""
    return ReportBatches(genesis, genesis_path).losses(weights)


class ReportBatches:
    """The validation and test report batches (seed 0), loaded once, and the canonical loss on them."""

    def __init__(self, genesis: Genesis, genesis_path: Path) -> None:
        from genesis import chunk_directory
        from training.data import load_split, sample_batch, seed_from_int

        self.genesis = genesis
        self.tables = genesis.tables()
        directory = chunk_directory(genesis_path, genesis)
        self.batches = []
        for split, sequences in (("validation", genesis.evaluation.validation_sequences),
                                 ("test", genesis.evaluation.test_sequences)):  # fmt: skip
            text = load_split(genesis.dataset, directory, split)
            self.batches.append((sample_batch(text, seed_from_int(0), sequences, genesis.model.context), sequences))

    def losses(self, weights: Any) -> tuple[float, float]:
        from training.evaluate import CanonicalEvaluator, default_backend, make_backend
        from training.tables import LOSS_BITS

        evaluator = CanonicalEvaluator(weights, self.tables, make_backend(default_backend("cpu")))
        context = self.genesis.model.context
        results = [
            round(evaluator.per_token_losses(*batch).loss_total / (sequences * context) / (1 << LOSS_BITS), 5)
            for batch, sequences in self.batches
        ]
        return results[0], results[1]


def centralized_baseline(genesis: Genesis, genesis_path: Path, steps: int, every: int) -> list[dict[str, Any]]:
    """The same model trained centralized for the chain's confirmed optimizer steps."""
    from genesis import chunk_directory
    from training.baseline import train_centralized
    from training.data import load_split
    from training.miner import TrainingConfig

    train_text = load_split(genesis.dataset, chunk_directory(genesis_path, genesis), "train")
    batches = ReportBatches(genesis, genesis_path)
    points: list[dict[str, Any]] = []

    def evaluate(weights: Any) -> float:
        validation, test = batches.losses(weights)
        points.append({"validation_loss": validation, "test_loss": test})
        return test

    curve, _ = train_centralized(genesis.initial_weights(), train_text, steps, TrainingConfig(), max(1, every),
                                 evaluate)  # fmt: skip
    return [{"steps": s, **point} for (s, _), point in zip(curve, points, strict=True)]


def replay(process: NodeProcess, genesis_path: Path) -> dict[str, Any]:
    """Re-validate a stopped node's stored chain from genesis (`potchain replay`)."""
    import subprocess

    from sim.processes import ROOT

    command = [sys.executable, "-c", "import sys, node; sys.exit(node.main())", "replay",
               "--genesis", str(genesis_path), "--datadir", str(process.datadir)]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        return {"ok": False, "error": completed.stderr.strip().splitlines()[-1:]}
    return {"ok": True, **json.loads(completed.stdout.strip().splitlines()[-1])}


def read_actions(process: NodeProcess) -> list[dict[str, Any]]:
    """What an adversary node did (it logs each action to DATADIR/actions.jsonl)."""
    path = process.datadir / "actions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_scenario(scenario: Scenario, out: Path, genesis_path: Path, genesis: Genesis) -> dict[str, Any]:
    """Run a scenario end to end; returns the report's data (see sim/report.py)."""
    out.mkdir(parents=True, exist_ok=True)
    say(f"scenario {scenario.name} seed {scenario.seed} (replay: potchain sim --scenario {scenario.path} "
        f"--seed {scenario.seed})")  # fmt: skip
    run = Run(scenario, out, genesis_path)
    failure = None
    data: dict[str, Any] = {}
    try:
        drive(run)
        data = collect(run)
    except NodeProcessError as error:
        failure = str(error)
        say(f"failed: {failure}")
    finally:
        codes = {}
        for process in run.processes.values():
            process.terminate()
        for index, process in run.processes.items():
            try:
                codes[process.name] = process.stop()
            except NodeProcessError as error:
                codes[process.name] = -9
                say(str(error))
            if index in run.crashed:
                codes[process.name] = 0  # killed on purpose and left down
    honest = [run.processes[s.index] for s in scenario.honest_nodes if s.index in run.processes]
    replays = {p.name: replay(p, genesis_path) for p in honest}
    honest_names = {p.name for p in honest}
    crashes = sum(1 for index in run.unexpected_exits if scenario.nodes[index].honest)
    crashes += sum(1 for name, code in codes.items() if name in honest_names and code not in (0,))
    data.update({
        "scenario": scenario.name, "seed": scenario.seed, "failure": failure, "exit_codes": codes,
        "timeline": run.timeline, "honest_node_crashes": crashes, "replays": replays,
        "stored_chains_valid": all(r["ok"] for r in replays.values()),
        "samples": run.samples, "node_starts": run.starts, "seconds": round(run.elapsed, 1),
    })  # fmt: skip
    if failure is None:
        steps = sum(b["body"].get("steps", 0) for b in data["chain"] if b["kind"] == "training" and b.get("confirmed"))
        say(f"centralized baseline: {steps} steps")
        data["baseline"] = centralized_baseline(genesis, genesis_path, steps, scenario.steps)
    return data


def collect(run: Run) -> dict[str, Any]:
    """Everything the report shows, read over the RPC from every node still running."""
    scenario = run.scenario
    statuses = {i: s for i, s in honest_statuses(run).items() if s is not None}
    reference_index = max(statuses, key=lambda i: statuses[i]["finalized_height"])
    reference = run.processes[reference_index]
    finalized_height = min(s["finalized_height"] for s in statuses.values())
    running = run.running()
    chain = collect_chain(reference, running, finalized_height + 1)
    confirmed = {b["hash"] for b in chain if b["kind"] == "validation" and b["body"].get("confirmed")}
    for block in chain:
        if block["kind"] == "training":
            after = next((b for b in chain if b["height"] == block["height"] + 1), None)
            block["confirmed"] = after is not None and after["hash"] in confirmed
    names = {p.info["peer_id"]: p.name for p in run.processes.values() if p.info}
    nodes = []
    for process in running:
        status = process.get("/v1/status")
        info = process.get("/v1/node")
        peers = process.get("/v1/peers")["peers"]
        nodes.append({
            "name": process.name, "honest": scenario.nodes[int(process.name.removeprefix("node"))].honest,
            "head_height": status["head_height"], "finalized_height": status["finalized_height"],
            "finalized_hash": status["finalized_hash"], "state_root": status["state_root"],
            "validation_loss": status["validation_loss"], "test_loss": status["test_loss"],
            "peer_scores": {names.get(p["peer_id"], p["peer_id"][:16]): p["score"] for p in peers},
            "connected_peers": sum(1 for p in peers if p["connected"]),
            "orphaned_blocks": info["orphaned_blocks"], "rejections": info["rejections"],
        })  # fmt: skip
    honest_hashes = {n["finalized_hash"] for n in nodes if n["honest"]}
    actions = []
    for index, process in run.processes.items():
        if not scenario.nodes[index].honest:
            for action in read_actions(process):
                actions.append({"node": process.name, "adversary": scenario.nodes[index].adversary, **action})
    canonical_hashes = {b["hash"] for b in chain}
    for action in actions:
        outcome_for(action, nodes, chain, reference)
    invalid_finalized = sum(1 for a in actions if a.get("invalid") and a.get("block") in canonical_hashes)
    return {
        "finalized_height": finalized_height,
        "honest_nodes_agree": len(honest_hashes) == 1,
        "invalid_blocks_finalized": invalid_finalized,
        "nodes": nodes,
        "chain": chain,
        "adversarial_actions": actions,
    }


def outcome_for(action: dict[str, Any], nodes: list[dict[str, Any]], chain: list[dict[str, Any]],
                reference: NodeProcess) -> None:  # fmt: skip
    """What the honest nodes did with one adversarial action (sets action["outcome"])."""
    sender = action.get("peer_id")
    by_hash = {b["hash"]: b for b in chain}
    rejected_by = [
        node["name"]
        for node in nodes
        if node["honest"] and any(rejection["peer_id"] == sender for rejection in node["rejections"])
    ]
    action["sender_scores"] = [n["peer_scores"].get(action["node"]) for n in nodes if n["honest"]]
    block = by_hash.get(action.get("block", ""))
    expect = action.get("expect")
    if expect == "slashed":
        stake = reference.get(f"/v1/accounts/{action['validator']}")["stake"]
        action["outcome"] = "slashed: stake 0" if stake == 0 else f"not slashed (stake {stake})"
    elif block is not None and action.get("invalid"):
        action["outcome"] = "FINALIZED although invalid"
    elif block is not None:
        after = next((b for b in chain if b["height"] == block["height"] + 1), None)
        confirmed = after is not None and after["body"].get("confirmed")
        action["outcome"] = "in the chain, confirmed out of sample" if confirmed else "rejected out of sample"
    elif expect == "rejected out of sample":
        action["outcome"] = "not in the chain (another block won its round)"
    elif expect == "stale":
        action["outcome"] = "ignored as stale: the round was decided without it"
    elif rejected_by:
        action["outcome"] = f"rejected by {len(rejected_by)} honest node(s)"
    else:
        action["outcome"] = "not relayed and not in the chain"
