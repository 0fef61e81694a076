"""The scenario runner: real node processes, a fault timeline, and what happened.

`run_scenario` starts the scenario's nodes as `potchain node` processes on
loopback (real libp2p, real LevelDB in the output directory; they decide
one block per height by voting rounds), applies the timeline (crash =
SIGKILL, restart, restart-all = SIGKILL every running node in the middle of
a height and start them all again, partition and heal through each node's
blocked-peer list, latency, late joins), waits until every honest node has
decided the target height and they hold the same block at their lowest
common head, collects every honest node's decided chain over the RPC (a
height at which two honest nodes hold different blocks is a conflicting
decision), stops the nodes cleanly, re-validates every honest node's stored
chain from genesis, trains the centralized baseline, and returns the
report's data.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chain.blocks import Block, DecidedBody, TrainingBody
from chain.crypto import devnet_key
from chain.state import State
from chain.store import ChainDB, CorruptStore
from consensus.decisions import compute_decided_rewards, is_committed
from consensus.genesis import Genesis
from consensus.rules import Chain, genesis_block, genesis_state
from p2p.rpc_client import HeadWatch
from sim.adversaries.copier import copier_key
from sim.processes import NodeProcess, NodeProcessError
from sim.scenario import Event, NodeSpec, Scenario

T = TypeVar("T")
U = TypeVar("U")

POLL_SECONDS = 1.0
"""The longest wait between two looks at the honest nodes' status (the timeline's tick): a height
decided is seen at once, the nodes' head events waking the waits."""
BASELINE_POINTS = 6
"""Evaluations of the centralized baseline along its steps (besides step 0)."""
MID_HEIGHT_SECONDS = 1.5
"""restart-all kills this long after a height was decided: the next height is being voted on
(a proposer waits a quarter of the 4.1 s propose timeout for a training block before it proposes)."""


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
    """run.elapsed when every honest node running had decided height 1: event and join times count from here."""
    starts: dict[str, list[float]] = field(default_factory=dict)
    """Wall-clock times each node was (re)started: blocks it fetched by syncing after a start did not
    propagate to it, so the report leaves them out of the propagation times."""
    remembered: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Each honest node's rejections and banned peers (ids), read before this run killed it."""
    confirmed: list[bool] = field(default_factory=list)
    """Whether the decided block at height i + 1 confirmed an update (read once per height)."""
    heads: HeadWatch = field(default_factory=HeadWatch)
    """The running honest nodes' head event streams, which wake the waits (closed when the run ends)."""

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
        flags += ["--steps", str(scenario.steps), "--log-level", "info", "--admin-rpc"]  # partitions, delays
        if scenario.proposal_wait is not None:
            flags += ["--proposal-wait", str(scenario.proposal_wait)]
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
        seconds = round(self.elapsed, 1)
        details: dict[str, Any] = {}
        if event.action == "restart-all":
            details = self.restart_all()
        elif event.action == "crash":
            self.remember_views([i for i in event.nodes if self.spec(i).honest])
            for index in event.nodes:
                self.processes[index].kill()
                self.crashed.add(index)
        elif event.action == "restart":
            self.start_nodes(list(event.nodes))
        elif event.action == "latency":
            for index in event.nodes:
                try:
                    post_json(self.processes[index], "/v1/admin/link-delay", {"seconds": event.ms / 1000})
                except (OSError, NodeProcessError) as error:
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
                except (OSError, NodeProcessError) as error:  # a node that is down misses the partition; it is reported
                    say(f"{self.elapsed:6.1f}s {event.action}: {process.name} did not answer: {error}")
        self.timeline.append({
            "seconds": seconds, "action": event.action,
            "nodes": list(event.nodes), "groups": [list(g) for g in event.groups], "ms": event.ms, **details,
        })  # fmt: skip

    def sample(self, index: int, status: dict[str, Any]) -> dict[str, Any]:
        """Note an honest node's status (the heights plot, the decision times); returns it."""
        voting = status.get("voting") or {}
        self.samples.append({"seconds": round(self.elapsed, 2), "time": round(time.time(), 2), "node": index,
                             "head_height": status["head_height"], "round": voting.get("round")})  # fmt: skip
        return status

    def remember_views(self, indices: list[int]) -> None:
        """Keep what these nodes rejected and banned before they are killed (a node keeps both in memory)."""

        def view(index: int) -> None:
            process = self.processes[index]
            try:
                rejections = process.get("/v1/node").get("rejections", [])
                banned = [p["peer_id"] for p in process.get("/v1/peers")["peers"] if p.get("banned")]
            except NodeProcessError:
                return
            self.remembered.setdefault(process.name, []).append({"rejections": rejections, "banned": banned})

        in_parallel(view, [i for i in indices if self.processes[i].is_running()])

    def restart_all(self) -> dict[str, Any]:
        """SIGKILL every running node in the middle of a height, then start them all again;
        the height and round the first honest node was voting on when they died."""
        indices = [i for i, p in sorted(self.processes.items()) if p.is_running() and i not in self.crashed]
        self.remember_views([i for i in indices if self.spec(i).honest])
        watch = next((i for i in indices if self.spec(i).honest), None)
        status: dict[str, Any] = {}
        if watch is not None:
            try:  # wait for a decision (20 s at most), then kill in the middle of the next height
                first = self.sample(watch, self.processes[watch].get("/v1/status"))["head_height"]
                until = time.monotonic() + 20
                while time.monotonic() < until:
                    if self.sample(watch, self.processes[watch].get("/v1/status"))["head_height"] != first:
                        break
                    self.heads.wait(1.0 if self.heads.connected else 0.1)  # polls while a stream is down
                time.sleep(MID_HEIGHT_SECONDS)
                status = self.sample(watch, self.processes[watch].get("/v1/status"))
            except NodeProcessError as error:
                say(f"{self.elapsed:6.1f}s restart-all: node{watch} did not answer: {error}")
        killed_at = round(self.elapsed, 1)
        for index in indices:
            self.processes[index].kill()
        voting = status.get("voting") or {}
        say(f"{self.elapsed:6.1f}s killed {len(indices)} nodes while node{watch} voted on "
            f"height {voting.get('height')} round {voting.get('round')}")  # fmt: skip
        self.start_nodes(indices)
        return {"seconds": killed_at, "killed": len(indices), "voting_height": voting.get("height"),
                "voting_round": voting.get("round"), "restarted_after": round(self.elapsed - killed_at, 1)}  # fmt: skip

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
    token = (process.datadir / "admin_token").read_text().strip()  # the admin endpoints' own token
    return process.post_json(path, document, token)


def in_parallel(function: Callable[[T], U], items: list[T], workers: int | None = None) -> list[U]:
    """function(item) for each item, in threads (the nodes answer RPCs and replay in parallel)."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=workers or len(items)) as pool:
        return list(pool.map(function, items))


def honest_statuses(run: Run) -> dict[int, dict[str, Any] | None]:
    """Each running honest node's /v1/status (None: it did not answer), asked of all at once."""
    indices = [
        spec.index for spec in run.scenario.honest_nodes
        if spec.index in run.processes and spec.index not in run.crashed and run.processes[spec.index].is_running()
    ]  # fmt: skip

    def status(index: int) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = run.processes[index].get("/v1/status")
            return answer
        except NodeProcessError:
            return None

    return dict(zip(indices, in_parallel(status, indices), strict=True))


def agreed_hash(run: Run, indices: list[int], height: int) -> str | None:
    """The block every one of these honest nodes holds at `height`, or None if they differ (or one does not answer)."""
    try:
        hashes = set(in_parallel(lambda i: str(run.processes[i].get(f"/v1/blocks/{height}")["hash"]), indices))
    except NodeProcessError:
        return None
    return hashes.pop() if len(hashes) == 1 else None


def confirmed_updates(run: Run, index: int, up_to: int) -> int:
    """Updates confirmed by the decided blocks 1..up_to (read from node `index`, each height once)."""
    for height in range(len(run.confirmed) + 1, up_to + 1):
        block = run.processes[index].get(f"/v1/blocks/{height}")
        run.confirmed.append(bool(block["body"].get("confirmed")))
    return sum(run.confirmed[:up_to])


def status_line(statuses: dict[int, dict[str, Any] | None]) -> str:
    """n0:12 n1:12r1 ...: each honest node's decided height, and its round on the next when not 0."""
    parts = []
    for index, status in statuses.items():
        if status is None:
            parts.append(f"n{index}:?")
            continue
        round = (status.get("voting") or {}).get("round") or 0
        parts.append(f"n{index}:{status['head_height']}" + (f"r{round}" if round else ""))
    return " ".join(parts)


def drive(run: Run) -> None:
    """Start the nodes, apply the timeline, and return once every honest node decided the target
    height and a height above the highest head at the last fault (the network recovered from it),
    the chain confirmed the scenario's updates, and the honest nodes hold the same block at their
    lowest common head (they keep deciding meanwhile: heads are not compared)."""
    scenario = run.scenario
    pending_events = list(scenario.events)
    joiners = sorted((spec for spec in scenario.nodes), key=lambda s: (s.join_at, s.index))
    for spec in joiners:
        run.address(spec.index)  # every node's address is known before any starts
    run.start_nodes([s.index for s in joiners if s.join_at == 0])
    started: float | None = None  # the timeline's zero: every honest node running decided height 1
    waiting = [s for s in joiners if s.join_at > 0]
    last_line = ""
    floor: int | None = 0  # every honest node must decide above this: the highest head after the last fault
    while run.elapsed < scenario.timeout:
        if started is not None:
            clock = run.elapsed - started
            while pending_events and pending_events[0].at <= clock:
                run.apply(pending_events.pop(0))
                floor = None
            due = [spec.index for spec in waiting if spec.join_at <= clock]
            if due:  # started together: each start waits for the node's RPC, and the timeline must not wait in turn
                waiting = [spec for spec in waiting if spec.join_at > clock]
                run.start_nodes(due)
        run.check_exits()
        statuses = honest_statuses(run)
        for index, status in statuses.items():
            if status is not None:
                run.sample(index, status)
        if floor is None and statuses and all(statuses.values()):
            floor = max(s["head_height"] for s in statuses.values() if s)
        line = status_line(statuses)
        if line != last_line:
            say(f"{run.elapsed:6.1f}s decided {line}")
            last_line = line
        if started is None and statuses and all(s and s["head_height"] >= 1 for s in statuses.values()):
            started = run.clock_zero = run.elapsed
            say(f"{run.elapsed:6.1f}s every honest node decided height 1: the timeline starts")
        everyone = len(statuses) == len(scenario.honest_nodes) and all(statuses.values())
        if everyone and not pending_events and not waiting:
            common = min(s["head_height"] for s in statuses.values() if s)
            try:
                if (common >= scenario.finalize and floor is not None and common > floor
                        and agreed_hash(run, list(statuses), common) is not None
                        and confirmed_updates(run, min(statuses), common) >= scenario.updates):  # fmt: skip
                    return
            except NodeProcessError as error:
                say(f"{run.elapsed:6.1f}s {error}")
        run.heads.watch(run.processes[i].rpc for i in statuses if "rpc" in run.processes[i].info)
        run.heads.wait(POLL_SECONDS)
    raise NodeProcessError(f"the honest nodes did not decide height {scenario.finalize} and agree"
                           + (f" with {scenario.updates} update(s) confirmed" if scenario.updates else "")
                           + f" within {scenario.timeout:.0f} s")  # fmt: skip


def honest_chains(processes: dict[int, NodeProcess], heads: dict[int, int]) -> dict[int, list[dict[str, Any]]]:
    """Every honest node's decided blocks 1..its head, as its RPC shows them."""
    indices = list(processes)
    chains = in_parallel(lambda i: [processes[i].get(f"/v1/blocks/{h}") for h in range(1, heads[i] + 1)], indices)
    return dict(zip(indices, chains, strict=True))


def conflicting_heights(chains: dict[int, list[dict[str, Any]]]) -> list[int]:
    """Heights at which two honest nodes hold different decided blocks."""
    top = max((len(blocks) for blocks in chains.values()), default=0)
    return [h for h in range(1, top + 1) if len({b[h - 1]["hash"] for b in chains.values() if len(b) >= h}) > 1]


def first_decided(samples: list[dict[str, Any]], up_to: int) -> dict[int, float]:
    """Per height, the first time (Unix seconds) the runner saw an honest node at or above it."""
    seen: dict[int, float] = {}
    for sample in sorted(samples, key=lambda s: s["time"]):
        for height in range(1, min(sample["head_height"], up_to) + 1):
            seen.setdefault(height, sample["time"])
    return seen


def collect_chain(reference: int, chains: dict[int, list[dict[str, Any]]], processes: dict[int, NodeProcess],
                  up_to: int, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """Decided blocks 1..up_to from the reference node's chain, with each honest node's arrival time,
    the time the height was first decided anywhere (the earliest arrival, or the runner's first
    sight of it: arrival times are kept in memory and lost when a node restarts), the training
    blocks each names (with their arrivals), and the model's losses after the block."""
    sighted = first_decided(samples, up_to)
    chain = []
    source = processes[reference]
    for height in range(1, up_to + 1):
        block = chains[reference][height - 1]
        arrivals = {
            processes[i].name: float(blocks[height - 1]["received_at"])
            for i, blocks in chains.items()
            if len(blocks) >= height and blocks[height - 1]["hash"] == block["hash"]
            and blocks[height - 1].get("received_at") is not None
        }  # fmt: skip
        commit = block.get("commit")
        body = block.get("body") or {}
        training = []
        for verdict in body.get("training", []):
            named = source.get(f"/v1/blocks/{verdict['training_block']}")
            seen = {}
            for process in processes.values():
                try:
                    at = process.get(f"/v1/blocks/{verdict['training_block']}").get("received_at")
                except NodeProcessError:
                    continue
                if at is not None:
                    seen[process.name] = float(at)
            training.append({"hash": named["hash"], "height": named["height"], "proposer": named["proposer"],
                             "body": named["body"], "arrivals": seen, "confirmed": bool(verdict["confirmed"]),
                             "test_gain": verdict["gain"]})  # fmt: skip
        chain.append({
            "height": height, "hash": block["hash"], "kind": block["kind"], "timestamp": block["timestamp"],
            "proposer": block["proposer"], "arrivals": arrivals, "body": body, "commit": commit,
            "round": commit["round"] if commit else None, "training_blocks": training,
            "validation_loss": None, "test_loss": None,
            "decided_at": min([*arrivals.values(), *([sighted[height]] if height in sighted else [])], default=None),
        })  # fmt: skip
    # The model changes only where an update was confirmed: its losses there (two report-batch
    # evaluations each, spread over the honest nodes), carried forward to the heights between.
    changed = [b["height"] for b in chain if b["body"].get("confirmed") or b["height"] == up_to]
    askers = list(processes.values())
    answers = in_parallel(lambda i: askers[i % len(askers)].get(f"/v1/model?height={changed[i]}", timeout=60),
                          list(range(len(changed))), len(askers))  # fmt: skip
    losses = dict(zip(changed, answers, strict=True))
    model: tuple[float | None, float | None] = (None, None)
    for block in chain:
        if block["height"] in losses:
            model = (losses[block["height"]]["validation_loss"], losses[block["height"]]["test_loss"])
        block["validation_loss"], block["test_loss"] = model
    return chain


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
        f"--seed {scenario.seed} --finalize {scenario.finalize})")  # fmt: skip
    run = Run(scenario, out, genesis_path)
    failure = None
    data: dict[str, Any] = {}
    try:
        drive(run)
        say(f"{run.elapsed:6.1f}s collecting")
        data = collect(run)
    except NodeProcessError as error:
        failure = str(error)
        say(f"failed: {failure}")
    finally:
        run.heads.close()
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
    say(f"{run.elapsed:6.1f}s replaying the stored chains")
    replays = dict(zip((p.name for p in honest), in_parallel(lambda p: replay(p, genesis_path), honest, 2),
                       strict=True))  # fmt: skip
    honest_names = {p.name for p in honest}
    crashes = sum(1 for index in run.unexpected_exits if scenario.nodes[index].honest)
    crashes += sum(1 for name, code in codes.items() if name in honest_names and code not in (0,))
    data.update({
        "scenario": scenario.name, "seed": scenario.seed, "failure": failure, "exit_codes": codes,
        "timeline": run.timeline, "honest_node_crashes": crashes, "replays": replays,
        "stored_chains_valid": all(r["ok"] for r in replays.values()),
        "samples": run.samples, "node_starts": run.starts, "seconds": round(run.elapsed, 1),
        "timeline_zero_seconds": round(run.clock_zero, 1),
    })  # fmt: skip
    if failure is None:
        say(f"{run.elapsed:6.1f}s judging the updates on {data['reference_node']}'s stored chain")
        try:
            judged = judge_updates_in_store(out / data["reference_node"] / "chain", genesis, data["finalized_height"],
                                            miner_roles(scenario), colluding_validators(scenario))  # fmt: skip
        except (ValueError, CorruptStore, KeyError) as error:
            failure = data["failure"] = f"judging the updates on {data['reference_node']}'s stored chain: {error}"
            say(f"failed: {failure}")
            return data
        data.update(judged)
        for action in data["adversarial_actions"]:
            if action.get("update"):
                action["outcome"] = update_outcome(action, judged["updates"], judged["update_heights"])
        steps = sum(t["body"].get("steps", 0) for b in data["chain"] for t in b["training_blocks"] if t["confirmed"])
        say(f"centralized baseline: {steps} steps")
        every = max(scenario.steps, -(-steps // BASELINE_POINTS))  # each point costs two report evaluations
        data["baseline"] = centralized_baseline(genesis, genesis_path, steps, every)
    return data


def collect(run: Run) -> dict[str, Any]:
    """Everything the report shows, read over the RPC from every node still running."""
    scenario = run.scenario
    statuses = {i: s for i, s in honest_statuses(run).items() if s is not None}
    if not statuses:
        raise NodeProcessError("no honest node answers")
    processes = {i: run.processes[i] for i in statuses}
    heads = {i: int(s["head_height"]) for i, s in statuses.items()}
    chains = honest_chains(processes, heads)
    conflicts = conflicting_heights(chains)
    common = min(heads.values())
    reference = max(heads, key=lambda i: (heads[i], -i))
    chain = collect_chain(reference, chains, processes, common, run.samples)
    agree = len({blocks[common - 1]["hash"] for blocks in chains.values()}) == 1 if common else True
    names = {p.info["peer_id"]: p.name for p in run.processes.values() if p.info}
    nodes = []
    for process in run.running():
        index = int(process.name.removeprefix("node"))
        status = process.get("/v1/status")
        info = process.get("/v1/node")
        peers = process.get("/v1/peers")["peers"]
        earlier = run.remembered.get(process.name, [])
        rejections = [r for view in earlier for r in view["rejections"]] + list(info.get("rejections", []))
        banned = {p["peer_id"] for p in peers if p.get("banned")} | {p for view in earlier for p in view["banned"]}
        nodes.append({
            "name": process.name, "honest": scenario.nodes[index].honest, "adversary": scenario.nodes[index].adversary,
            "head_height": status["head_height"], "head_hash": status["head_hash"], "state_root": status["state_root"],
            "validation_loss": status["validation_loss"], "test_loss": status["test_loss"],
            "voting": status.get("voting"),
            "peer_scores": {names.get(p["peer_id"], p["peer_id"][:16]): p["score"] for p in peers},
            "banned_peers": sorted(names.get(p, p[:16]) for p in banned),
            "connected_peers": sum(1 for p in peers if p["connected"]),
            "rejections": rejections,
        })  # fmt: skip
    evidence = [{"included_at": b["height"], **e} for b in chain for e in b["body"].get("evidence", [])]
    source = run.processes[reference]
    equivocators = []
    for spec in scenario.nodes:
        if spec.adversary == "equivocator":
            for validator in spec.validators:
                address = devnet_key(f"validator-{validator}").public_key.hex()
                stake = source.get(f"/v1/accounts/{address}")["stake"]
                included = [e["included_at"] for e in evidence if e["validator"] == address]
                equivocators.append({"node": spec.name, "validator": address, "stake": stake,
                                     "evidence_included_at": included})  # fmt: skip
    actions = []
    for index, process in run.processes.items():
        if not scenario.nodes[index].honest:
            for action in read_actions(process):
                actions.append({"node": process.name, "adversary": scenario.nodes[index].adversary, **action})
    for action in actions:
        outcome_for(action, nodes, chain, equivocators)
    decided = {b["hash"] for b in chain} | {t["hash"] for b in chain for t in b["training_blocks"]}
    invalid_finalized = sum(1 for a in actions if a.get("invalid") and a.get("block") in decided)
    return {
        "finalized_height": common,
        "reference_node": processes[reference].name,
        "head_heights": {processes[i].name: h for i, h in heads.items()},
        "conflicting_decisions": len(conflicts),
        "conflicting_heights": conflicts,
        "honest_nodes_agree": agree,
        "invalid_blocks_finalized": invalid_finalized,
        "rounds_per_height": [b["round"] + 1 if b["round"] is not None else None for b in chain],
        "evidence": evidence,
        "equivocators": equivocators,
        "equivocators_slashed": all(e["stake"] == 0 and e["evidence_included_at"] for e in equivocators)
        if equivocators
        else None,
        "nodes": nodes,
        "chain": chain,
        "adversarial_actions": actions,
    }


def outcome_for(action: dict[str, Any], nodes: list[dict[str, Any]], chain: list[dict[str, Any]],
                equivocators: list[dict[str, Any]]) -> None:  # fmt: skip
    """What the honest nodes did with one adversarial action (sets action["outcome"])."""
    sender = action.get("peer_id")
    named = {t["hash"]: (b, t) for b in chain for t in b["training_blocks"]}
    by_hash = {b["hash"]: b for b in chain}
    block = action.get("block") or ""
    honest = [n for n in nodes if n["honest"]]
    rejected_by = [
        n["name"] for n in honest
        if any(r["peer_id"] == sender and (not block or block[:16] in r["what"] or block[:16] in r["reason"])
               for r in n["rejections"])
    ]  # fmt: skip
    banned_by = [n["name"] for n in honest if action["node"] in n["banned_peers"]]
    action["sender_scores"] = [n["peer_scores"].get(action["node"]) for n in honest]
    expect = action.get("expect")
    if expect == "slashed":
        record = next((e for e in equivocators if e["validator"] == action.get("validator")), None)
        if record is None:
            action["outcome"] = "not a validator of an equivocator node"
        elif record["stake"] == 0 and record["evidence_included_at"]:
            first = record["evidence_included_at"][0]
            action["outcome"] = f"slashed: stake 0 (evidence in the decided block at height {first})"
        else:
            action["outcome"] = f"NOT slashed: stake {record['stake']}, evidence at {record['evidence_included_at']}"
    elif "blocks" in action:  # variants of one training block
        hits = [named[h] for h in action["blocks"] if h in named]
        height = action.get("height", 0) + 1
        decided = next((b for b in chain if b["height"] == height), None)
        rounds = ""
        if decided is not None and decided["round"] is not None:
            rounds = f"; height {height} decided in round {decided['round']}"
        original = named.get(action.get("original") or "")
        if hits or original:
            b, t = hits[0] if hits else original  # type: ignore[misc]
            which = "one variant" if hits else "the original"
            verdict = "confirmed" if t["confirmed"] else "rejected"
            action["outcome"] = f"{which} named at height {b['height']}, {verdict} out of sample{rounds}"
        else:
            action["outcome"] = f"neither the original nor a variant named{rounds}"
    elif block in named or block in by_hash:
        entry = named[block][0] if block in named else by_hash[block]
        if action.get("invalid"):
            action["outcome"] = f"FINALIZED although invalid (height {entry['height']})"
        else:
            action["outcome"] = f"named by the decided block at height {entry['height']}"
    elif expect == "not served":
        action["outcome"] = "never served: named by no decided block"
        if rejected_by:
            action["outcome"] += f"; the announcer penalized by {len(rejected_by)} honest node(s)"
    elif rejected_by:
        action["outcome"] = f"rejected by {len(rejected_by)} honest node(s)"
    elif banned_by:
        action["outcome"] = f"not relayed: the sender is banned by {len(banned_by)} honest node(s)"
    else:
        action["outcome"] = "not relayed and not in the chain"


# --- the out-of-sample check's adversaries, judged on an honest node's stored chain ---------

COPIER_KINDS = ("copier", "perturbing-copier")


@dataclass(frozen=True)
class MinerRole:
    """Who mines with a key in a scenario."""

    node: str
    """The node that holds the key (node0, ...)."""
    kind: str
    """"honest", or the node's adversary kind."""


def miner_roles(scenario: Scenario) -> dict[bytes, MinerRole]:
    """Every miner key of the scenario's nodes: an honest or adversarial node's in-process
    miner (devnet:sim-SEED-miner-INDEX), an adversary's own key (devnet:adversary-NAME), a
    copier's key (`copier_key`)."""
    roles: dict[bytes, MinerRole] = {}
    for spec in scenario.nodes:
        role = MinerRole(spec.name, spec.adversary or "honest")
        if spec.mine:
            roles[devnet_key(f"sim-{scenario.seed}-miner-{spec.index}").public_key] = role
        if spec.adversary and not spec.mine:
            roles[devnet_key(f"adversary-{spec.name}").public_key] = role
        if spec.adversary in COPIER_KINDS:
            roles[copier_key(spec.name).public_key] = role
    return roles


def colluding_validators(scenario: Scenario) -> dict[bytes, str]:
    """The validator keys of colluder nodes (their shards are their miners'), by address: the node."""
    return {
        devnet_key(f"validator-{validator}").public_key: spec.name
        for spec in scenario.nodes if spec.adversary == "colluder" for validator in spec.validators
    }  # fmt: skip


def judge_updates_in_store(path: Path, genesis: Genesis, up_to: int, roles: dict[bytes, MinerRole],
                           colluders: dict[bytes, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """`judge_updates` on the chain database at `path` (a stopped node's DATADIR/chain)."""
    state = genesis_state(genesis)
    db = ChainDB(path, bytes.fromhex(genesis.hash), genesis_block(genesis, state), state)
    try:
        return judge_updates(db, Chain(genesis, validation_text=b"", test_text=b""), up_to, roles, colluders or {})
    finally:
        db.close()


def judge_updates(db: ChainDB, chain: Chain, up_to: int, roles: dict[bytes, MinerRole],
                  colluders: dict[bytes, str]) -> dict[str, Any]:  # fmt: skip
    """Every training block the decided blocks 1..up_to name, as the stored chain judged it:
    committed in its parent, its test gain, applied, the miner's pay; per height who proposed
    and which were named; the rewards paid to copier keys; the finalized model's loss on every
    held-out sequence revealed so far against the genesis model's (`Chain.loss_on`, one batch
    of test_sequences per test); the honest miners' share of applied updates; and the
    colluders' named and applied updates at their validators' heights and at others'."""
    from training.tables import LOSS_BITS

    genesis_hash = db.canonical_hash(0)
    if genesis_hash is None:
        raise ValueError("judge updates: the store holds no genesis block")
    parent = db.block(genesis_hash)
    first_state = db.state(genesis_hash)
    updates: list[dict[str, Any]] = []
    heights: list[dict[str, Any]] = []
    paid_to: dict[bytes, int] = {}
    tests: list[tuple[bytes, ...]] = []
    for height in range(1, up_to + 1):
        block_hash = db.canonical_hash(height)
        if block_hash is None:
            raise ValueError(f"judge updates: the store holds no decided block at height {height}, want {up_to}")
        block = db.block(block_hash)
        body = block.body
        if not isinstance(body, DecidedBody):
            raise ValueError(f"judge updates: the block at height {height} is not a decided block")
        for reward in body.rewards:
            paid_to[reward.address] = paid_to.get(reward.address, 0) + reward.amount
        gains = body.gains()
        named_blocks = [db.block(verdict.training_block) for verdict in body.training]
        paid_miners = {training.header.proposer: gains[training.hash] for training in named_blocks
                       if training.hash in body.applied and is_committed(parent, training)}  # fmt: skip
        # The miners' part of the block's rewards (the rules checked the block pays exactly this).
        miner_rewards = compute_decided_rewards(chain.genesis, paid_miners, {})
        miner_pay = {reward.address: reward.amount for reward in miner_rewards}
        named = []
        for training in named_blocks:
            miner = training.header.proposer
            role = roles.get(miner, MinerRole("", "unknown"))
            committed = is_committed(parent, training)
            applied = training.hash in body.applied
            paid = miner_pay.get(miner, 0) if applied and committed else 0
            named.append({
                "hash": training.hash.hex(), "decided_at": height, "miner": miner.hex(), "node": role.node,
                "kind": role.kind, "committed": committed, "test_gain": gains[training.hash],
                "validation_gain": validation_gain(training), "applied": applied, "paid": paid,
            })  # fmt: skip
        proposer = block.header.proposer
        heights.append({"height": height, "proposer": proposer.hex(), "colluding_proposer": colluders.get(proposer),
                        "named": [entry["hash"] for entry in named],
                        "honest_named": any(entry["kind"] == "honest" for entry in named),
                        "commitments": [commitment.miner.hex() for commitment in body.commitments],
                        "applied": [applied_hash.hex() for applied_hash in body.applied]})  # fmt: skip
        updates.extend(named)
        if body.test is not None:
            tests.append(tuple(revealed.sequence for revealed in body.test.sequences))
        parent = block
    final_state = db.state(parent.hash)
    tokens = sum(len(sequences) for sequences in tests) * chain.genesis.model.context

    def mean_loss(totals: list[int]) -> float | None:
        return round(sum(totals) / tokens / (1 << LOSS_BITS), 5) if tokens else None

    samples = model_samples(chain, first_state, final_state)
    loss_genesis = mean_loss([chain.loss_on(first_state, sequences) for sequences in tests])
    loss_finalized = mean_loss([chain.loss_on(final_state, sequences) for sequences in tests])
    applied_updates = [entry for entry in updates if entry["applied"]]
    copier_keys_used = {key for key, role in roles.items() if role.kind in COPIER_KINDS}
    return {
        "updates": updates,
        "update_heights": heights,
        **overfitter_summary(updates),
        "copier_rewards": sum(amount for address, amount in paid_to.items() if address in copier_keys_used),
        "heldout_sequences_revealed": sum(len(sequences) for sequences in tests),
        "heldout_loss_genesis": loss_genesis,
        "heldout_loss_finalized": loss_finalized,
        "honest_applied_share": round(
            sum(1 for e in applied_updates if e["kind"] == "honest") / len(applied_updates), 4
        )
        if applied_updates
        else None,
        "applied_by_kind": {
            kind: sum(1 for e in applied_updates if e["kind"] == kind)
            for kind in sorted({e["kind"] for e in applied_updates})
        },
        "colluders": [colluder_summary(node, validator, heights, updates) for validator, node in colluders.items()],
        "model_samples": samples,
    }


SAMPLE_PROMPT = "ROMEO:\n"
"""The prompt the report's model samples continue."""


def model_samples(chain: Chain, genesis: State, finalized: State) -> dict[str, Any]:
    """Text the genesis model and the finalized one continue SAMPLE_PROMPT with (the same
    settings and seed: what training changed shows in the text)."""
    from training.sample import SampleSettings, sample_text

    settings = SampleSettings(tokens=200, temperature=0.8, top_k=None, seed=0)
    return {
        "prompt": SAMPLE_PROMPT, "tokens": settings.tokens, "temperature": settings.temperature, "seed": settings.seed,
        "genesis": sample_text(chain.weights(genesis), SAMPLE_PROMPT, settings),
        "finalized": sample_text(chain.weights(finalized), SAMPLE_PROMPT, settings),
    }  # fmt: skip


def validation_gain(training: Block) -> int:
    """A training block's claimed (and checked) gain on its own validation batch."""
    assert isinstance(training.body, TrainingBody)
    return training.body.loss_before - training.body.loss_after


TRAINING_SPLIT_KINDS = ("honest", "variant-spammer")
"""The miners that train on the training split (the variant spammer's miner trains honestly
and re-signs its blocks): the overfitter's rivals."""


def overfitter_summary(updates: list[dict[str, Any]]) -> dict[str, Any]:
    """The overfitter's updates against the training-split miners' named at the same heights.

    `overfit_updates_decided` (target 0) counts the overfitter's updates applied at a height
    where a committed candidate trained on the training split gained more out of sample and
    was left out: an update that fits the validation split displacing one that generalizes
    better (applied beside it, combined, it displaces nothing: section 18). (An
    uncommitted candidate ranks below every committed one whoever trained it, section 17.3:
    a miner whose commitment missed its block races for nothing, and a copy could not be
    told from it.) `overfitter_contests` lists every height where both were named, with their
    validation and held-out gains, so a reader sees which rule decided (the held-out gain)
    and what a validation-gain rule would have chosen; the overfitter's wins by a larger
    held-out gain are counted apart (`overfitter_wins_by_heldout_gain`): training on the
    validation split is training on public text, and an update that gains more on sequences
    nobody trained on is the better one. An overfitter's update applied together with every
    committed rival that gained more counts as neither."""
    named_at: dict[int, list[dict[str, Any]]] = {}
    for entry in updates:
        named_at.setdefault(entry["decided_at"], []).append(entry)
    contests = []
    displaced = wins = 0
    for height, named in sorted(named_at.items()):
        overfitting = [e for e in named if e["kind"] == "overfitter"]
        rivals = [e for e in named if e["kind"] in TRAINING_SPLIT_KINDS]
        if not overfitting or not rivals:
            continue
        for entry in overfitting:
            if not entry["applied"]:
                continue
            better = [e for e in rivals if e["committed"] and e["test_gain"] > entry["test_gain"]]
            if any(not e["applied"] for e in better):
                displaced += 1
            elif not better:
                wins += 1
        keep = ("kind", "committed", "validation_gain", "test_gain", "applied")
        contests.append({"height": height, "overfitter": [{k: e[k] for k in keep} for e in overfitting],
                         "rivals": [{k: e[k] for k in keep} for e in rivals]})  # fmt: skip
    return {"overfit_updates_decided": displaced, "overfitter_wins_by_heldout_gain": wins,
            "overfitter_contests": contests}  # fmt: skip


def colluder_summary(node: str, validator: bytes, heights: list[dict[str, Any]],
                     updates: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """A colluder's updates at the heights its validator proposed (tested on the shard its miner
    trained on) and at other proposers' heights (tested on shards it never saw)."""
    own = {entry["height"] for entry in heights if entry["proposer"] == validator.hex()}
    ours = [entry for entry in updates if entry["node"] == node and entry["kind"] == "colluder"]
    at_own = [entry for entry in ours if entry["decided_at"] in own]
    elsewhere = [entry for entry in ours if entry["decided_at"] not in own]
    return {
        "node": node, "validator": validator.hex(), "heights_proposed": sorted(own), "heights": len(heights),
        "named_at_own_heights": len(at_own), "applied_at_own_heights": sum(1 for e in at_own if e["applied"]),
        "named_elsewhere": len(elsewhere), "applied_elsewhere": sum(1 for e in elsewhere if e["applied"]),
        "test_gains_at_own_heights": [e["test_gain"] for e in at_own],
        "test_gains_elsewhere": [e["test_gain"] for e in elsewhere],
    }  # fmt: skip


def update_outcome(action: dict[str, Any], updates: list[dict[str, Any]], heights: list[dict[str, Any]]) -> str:
    """What the decided chain did with one update an adversary committed to, revealed or copied."""
    block = action.get("block")
    if block is not None:
        entry = next((e for e in updates if e["hash"] == block), None)
        if entry is None:
            return "named by no decided block"
        committed = "committed" if entry["committed"] else "uncommitted"
        verdict = f"named at height {entry['decided_at']} ({committed}, test gain {entry['test_gain']})"
        if not entry["applied"]:
            return f"{verdict}: not applied"
        return f"{verdict}: applied, " + (f"paid {entry['paid']}" if entry["paid"] else "not paid")
    decided = next((h for h in heights if h["height"] == action.get("height")), None)
    if decided is None:
        return f"height {action.get('height')} is past the finalized height"
    carried = action.get("miner") in decided["commitments"]
    where = f"the decided block at height {decided['height']}"
    if action["action"].startswith("committed"):
        return f"carried by {where}" if carried else f"not carried by {where}"
    return f"not revealed; the commitment {'was' if carried else 'was not'} carried by {where}"
