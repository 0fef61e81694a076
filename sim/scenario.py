"""Simulation scenarios: which nodes run, what each one does, and a timeline of faults.

A scenario is a TOML file (sim/scenarios/*.toml):

    name = "honest"
    seed = 7            # replay with the same seed: same keys, same random choices
    finalize = 8        # done once every honest node decided this height (and they agree)
    updates = 1         # ... and the decided blocks confirmed at least this many updates (default 0)
    timeout = 900       # seconds before the run gives up
    steps = 30          # miners' optimizer steps per attempt
    proposal_wait = 30  # seconds a height's proposer waits for miners (default: the node's)

    [[node]]            # one table per node, in order (node 0, node 1, ...)
    mine = true
    validators = [0]    # devnet validator keys validator-0, ... (they vote and propose)
    join_at = 0         # 0: started first; > 0: a late joiner, this many seconds after the start
    adversary = ""      # "" (honest) or one of ADVERSARIES

    [[event]]           # the fault timeline
    at = 30             # seconds after the start
    action = "crash"    # crash | restart | restart-all | partition | heal | latency
    nodes = [3]         # crash, restart, latency: these nodes (restart-all: SIGKILL every
                        # running node in the middle of a height, then start them all again)
    groups = [[0, 1, 2], [3, 4, 5]]   # partition: nodes only reach their own group
    ms = 300            # latency: added to everything the nodes send (0 removes it)

"The start" is when every honest node started first has decided height 1 (the
network runs), so the timeline does not depend on how long the processes took
to start. Every field is checked on load; a mistake names the file, the table
and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIONS = ("crash", "restart", "restart-all", "partition", "heal", "latency")
ADVERSARIES = (
    "equivocator",
    "variant-spammer",
    "false-claims",
    "withholder",
    "overfitter",
    "public-data",
    "copier",
    "perturbing-copier",
    "colluder",
)


class ScenarioError(ValueError):
    """A scenario file that does not describe a runnable scenario."""


@dataclass(frozen=True)
class NodeSpec:
    """One node of a scenario."""

    index: int
    mine: bool
    """Runs the in-process miner."""
    validators: tuple[int, ...]
    """Devnet validator keys it votes and proposes with."""
    join_at: float
    """Seconds after the start (every first node decided height 1) when it starts; 0: first."""
    adversary: str
    """"" for an honest node, else its misbehaviour (one of ADVERSARIES)."""

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def honest(self) -> bool:
        return not self.adversary


@dataclass(frozen=True)
class Event:
    """One fault on the timeline."""

    at: float
    action: str
    nodes: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    ms: int = 0
    """latency: milliseconds added to what the nodes send."""


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    finalize: int
    """Done once every honest node decided this height."""
    timeout: float
    steps: int
    nodes: tuple[NodeSpec, ...]
    events: tuple[Event, ...]
    path: Path
    updates: int = 0
    """... and the decided chain confirmed at least this many updates (the loss fell)."""
    proposal_wait: float | None = None
    """Every node's `--proposal-wait` (None: the node's default, genesis's propose timeout)."""

    @property
    def honest_nodes(self) -> list[NodeSpec]:
        return [node for node in self.nodes if node.honest]


class _Table:
    """Typed reads of one TOML table, with errors that say where."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ScenarioError(f"{where}: expected a table")
        self.value, self.where, self.used = value, where, set[str]()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.value:
            if default is None:
                raise ScenarioError(f"{self.where}: missing {key!r}")
            return default
        value = self.value[key]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
            raise ScenarioError(f"{self.where}.{key}: expected {kind}, got a boolean")
        if not isinstance(value, kind):
            raise ScenarioError(f"{self.where}.{key}: expected {kind}, got {type(value).__name__}")
        return value

    def done(self) -> None:
        unknown = set(self.value) - self.used
        if unknown:
            raise ScenarioError(f"{self.where}: unknown field(s) {', '.join(sorted(unknown))}")


def _indices(value: Any, where: str, limit: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ScenarioError(f"{where}: expected a list of integers")
    for index in value:
        if not 0 <= index < limit:
            raise ScenarioError(f"{where}: {index} is out of range 0..{limit - 1}")
    return tuple(value)


def load_scenario(path: Path, validators: int) -> Scenario:
    """Parse and check a scenario; `validators` is the number of genesis validators."""
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path}: not TOML: {error}") from None
    top = _Table(document, str(path))
    name = top.get("name", str)
    seed = top.get("seed", int)
    finalize = top.get("finalize", int)
    updates = top.get("updates", int, 0)
    timeout = float(top.get("timeout", (int, float), 900))
    steps = top.get("steps", int, 30)
    wait = top.get("proposal_wait", (int, float)) if "proposal_wait" in top.value else None
    raw_nodes = top.get("node", list)
    raw_events = top.get("event", list, [])
    top.done()
    if finalize < 1 or steps < 1 or timeout <= 0 or updates < 0:
        raise ScenarioError(f"{path}: finalize and steps must be at least 1, updates at least 0, timeout positive")
    if wait is not None and not 0 <= wait <= 600:
        raise ScenarioError(f"{path}: proposal_wait must be from 0 to 600 seconds, got {wait}")
    nodes = []
    for index, raw in enumerate(raw_nodes):
        table = _Table(raw, f"{path}: node {index}")
        spec = NodeSpec(
            index=index,
            mine=table.get("mine", bool, False),
            validators=_indices(table.get("validators", list, []), f"{table.where}.validators", validators),
            join_at=float(table.get("join_at", (int, float), 0)),
            adversary=table.get("adversary", str, ""),
        )
        table.done()
        if spec.adversary and spec.adversary not in ADVERSARIES:
            raise ScenarioError(f"{table.where}.adversary: {spec.adversary!r}, want one of {', '.join(ADVERSARIES)}")
        nodes.append(spec)
    if not nodes:
        raise ScenarioError(f"{path}: no [[node]] tables")
    if not any(node.honest and node.join_at == 0 for node in nodes):
        raise ScenarioError(f"{path}: at least one honest node must start at 0")
    dealt = [v for node in nodes for v in node.validators]
    if len(dealt) != len(set(dealt)):
        raise ScenarioError(f"{path}: a validator key is given to two nodes")
    events = []
    for index, raw in enumerate(raw_events):
        table = _Table(raw, f"{path}: event {index}")
        action = table.get("action", str)
        if action not in ACTIONS:
            raise ScenarioError(f"{table.where}.action: {action!r}, want one of {', '.join(ACTIONS)}")
        at = float(table.get("at", (int, float)))
        targets = _indices(table.get("nodes", list, []), f"{table.where}.nodes", len(nodes))
        groups = tuple(_indices(g, f"{table.where}.groups", len(nodes)) for g in table.get("groups", list, []))
        ms = table.get("ms", int, 0) if "ms" in table.value else 0
        table.used.add("ms")
        table.done()
        if action == "latency" and (not targets or not 0 <= ms <= 10_000):
            raise ScenarioError(f"{table.where}: latency needs nodes and 0 <= ms <= 10000")
        if action in ("crash", "restart") and not targets:
            raise ScenarioError(f"{table.where}: {action} needs nodes")
        if action == "partition" and len(groups) < 2:
            raise ScenarioError(f"{table.where}: partition needs at least two groups")
        events.append(Event(at, action, targets, groups, ms))
    ordered = tuple(sorted(events, key=lambda e: e.at))
    proposal_wait = None if wait is None else float(wait)
    return Scenario(name, seed, finalize, timeout, steps, tuple(nodes), ordered, path, updates, proposal_wait)
