"""A simulated network for the voting state machine (consensus/voting.py).

Nodes run `HeightVoting` height after height; a discrete-event loop carries
their messages with random delays, reordering, duplicates and drops until the
global stabilization time (GST), and within `delay_ms` after it (a message
dropped before GST is delivered after it: gossip re-sends what it holds, so
every message sent is eventually delivered). Block checks take time; blocks
are valid unless a faulty node made them invalid.

Faulty validators (their behaviour by name):
- `silent`: never sends anything (nor relays);
- `equivocate`: runs the honest machine, but sends half the nodes its real
  messages and the other half conflicting ones (another block or nil; as
  proposer, two different valid blocks);
- `invalid`: proposes invalid blocks and prevotes and precommits for them;
- `stopped`: silent until `stopped_until_ms`, then honest (messages sent to
  it meanwhile are re-sent when it starts);
- `forgetful`: runs the honest machine but forgets its lock at every event,
  so it prevotes for any valid proposal (the amnesia attack: not provable).

Everything is driven by one seed (`NetworkConfig.seed`): a run is replayed
exactly by running its config again. Honest nodes relay every message they
receive for the first time, as gossip does; faulty ones relay nothing.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field, replace

from chain.votes import Commit, Proposal, Vote, VoteKind
from consensus.voting import (
    Action,
    Broadcast,
    CheckBlock,
    Decide,
    Equivocation,
    HeightVoting,
    ProposeValue,
    ScheduleTimeout,
    SignerState,
    Timeout,
    TimeoutParameters,
    ValidatorSet,
)

FAULTS = ("silent", "equivocate", "invalid", "forgetful")
"""The faults the property tests draw from (`stopped` is for named tests)."""


@dataclass(frozen=True)
class NetworkConfig:
    """One simulated run."""

    seed: int
    """Drives every random choice of the run."""
    stakes: tuple[int, ...]
    """Honest validators' stakes."""
    faulty: tuple[tuple[str, int], ...] = ()
    """(behaviour, stake) of each faulty validator."""
    heights: int = 3
    """Heights every honest node must decide."""
    gst_ms: int = 0
    """Until then, delays are arbitrary (up to GST + delay_ms) and messages drop and duplicate."""
    delay_ms: int = 200
    """The most a message takes after GST."""
    drop_percent: int = 20
    """Chance a message is dropped (then delivered after GST) before GST."""
    duplicate_percent: int = 10
    """Chance a message is delivered twice before GST."""
    check_ms: int = 100
    """Time to check a block against the rules."""
    timeouts: TimeoutParameters = field(default_factory=lambda: TimeoutParameters(1000, 500, 500, 250))
    """The machine's timeouts."""
    partition: bool = False
    """Until GST, honest nodes are split in two halves whose messages to each other wait for GST;
    faulty nodes reach both."""
    slow_first_proposals_ms: int = 0
    """Extra delay on every round-0 proposal (a slow proposer)."""
    restarts: int = 0
    """How many times an honest node crashes (at random events) and restarts from its saved signer state."""
    stopped_until_ms: int = 0
    """When `stopped` validators start."""
    limit_ms: int = 600_000
    """Simulated time after which the run stops."""


@dataclass
class SimulatedNode:
    """One validator of the simulated network."""

    key: bytes
    fault: str | None
    voting: HeightVoting | None = None
    decisions: dict[int, Commit] = field(default_factory=dict)
    decided_at: dict[int, int] = field(default_factory=dict)
    """Simulated time (ms) of each decision."""
    buffered: list[Proposal | Vote] = field(default_factory=list)
    saved: SignerState | None = None
    """The signer state as last saved before a signature."""
    signed: list[Proposal | Vote] = field(default_factory=list)
    """Every message this node signed (to check it never signs conflicting ones)."""
    rounds_after_gst: dict[int, int] = field(default_factory=dict)
    """Per height: the node's round when the height started or at GST, whichever was later."""


@dataclass
class NetworkRun:
    """What a run produced."""

    nodes: list[SimulatedNode]
    validators: ValidatorSet
    evidence: list[Equivocation]
    time_ms: int
    invalid_blocks: set[bytes]

    @property
    def honest(self) -> list[SimulatedNode]:
        return [node for node in self.nodes if node.fault is None]

    def decided(self, height: int) -> set[bytes]:
        return {node.decisions[height].block_hash for node in self.honest if height in node.decisions}

    def rounds_taken_after_gst(self) -> list[int]:
        """For each honest node and height: rounds from the later of its start and GST to its decision."""
        return [
            node.decisions[height].round - start
            for node in self.honest
            for height, start in node.rounds_after_gst.items()
            if height in node.decisions
        ]


def make_key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def run_network(config: NetworkConfig) -> NetworkRun:
    """Run the network until every honest node decided `config.heights` heights, or the time limit."""
    rng = random.Random(config.seed)
    nodes = [SimulatedNode(make_key(f"honest-{i}"), None) for i in range(len(config.stakes))]
    nodes += [SimulatedNode(make_key(f"faulty-{i}-{fault}"), fault) for i, (fault, _) in enumerate(config.faulty)]
    stakes = list(config.stakes) + [stake for _, stake in config.faulty]
    validators = ValidatorSet({node.key: stake for node, stake in zip(nodes, stakes, strict=True)}, 2, 3)
    queue: list[tuple[int, int, int, object]] = []
    sequence = 0
    now = 0
    evidence: list[Equivocation] = []
    invalid_blocks: set[bytes] = set()
    valid_blocks: set[bytes] = set()
    relayed: list[set[Proposal | Vote]] = [set() for _ in nodes]
    received: list[list[Proposal | Vote | Commit]] = [[] for _ in nodes]
    """Every message and certificate sent to each node: peers re-send them to a node that
    restarted (as gossip and sync do: a decided peer serves its certificate)."""

    def schedule(at: int, node: SimulatedNode, event: object) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(queue, (at, sequence, nodes.index(node), event))

    def side(node: SimulatedNode) -> int:
        """-1 or 1: the node's half in a partition; 0 for a faulty node (it reaches both)."""
        index = nodes.index(node)
        return 0 if node.fault is not None else (1 if 2 * index < len(config.stakes) else -1)

    def delay() -> int:
        if now < config.gst_ms:
            return rng.randint(0, config.gst_ms - now + config.delay_ms)
        return rng.randint(0, config.delay_ms)

    def send(sender: SimulatedNode, message: Proposal | Vote, to: list[SimulatedNode]) -> None:
        for node in to:
            if node is sender:
                continue
            received[nodes.index(node)].append(message)
            extra = config.slow_first_proposals_ms if isinstance(message, Proposal) and message.round == 0 else 0
            if now < config.gst_ms and config.partition and side(sender) * side(node) < 0:
                schedule(config.gst_ms + rng.randint(0, config.delay_ms) + extra, node, message)
                continue
            if now < config.gst_ms and rng.randrange(100) < config.drop_percent:
                schedule(config.gst_ms + rng.randint(0, config.delay_ms) + extra, node, message)
                continue
            schedule(now + delay() + extra, node, message)
            if now < config.gst_ms and rng.randrange(100) < config.duplicate_percent:
                schedule(now + delay() + extra, node, message)

    def send_commit(sender: SimulatedNode, commit: Commit) -> None:
        """A decided node gives its certificate to every peer (as gossip and sync do)."""
        for node in nodes:
            if node is not sender:
                received[nodes.index(node)].append(commit)
                schedule(max(now, config.gst_ms) + rng.randint(0, config.delay_ms), node, commit)

    def new_block(maker: SimulatedNode, height: int, round: int, tag: str, valid: bool) -> bytes:
        block = hashlib.sha256(f"{maker.key.hex()}/{height}/{round}/{tag}".encode()).digest()
        (valid_blocks if valid else invalid_blocks).add(block)
        return block

    def conflicting(message: Proposal | Vote, sender: SimulatedNode) -> Proposal | Vote:
        if isinstance(message, Proposal):
            return replace(message, block_hash=new_block(sender, message.height, message.round, "twin", True))
        other = None if message.block_hash is not None else new_block(sender, message.height, message.round, "v", True)
        return replace(message, block_hash=other)

    def start_height(node: SimulatedNode, height: int) -> None:
        node.voting = HeightVoting(height, validators, config.timeouts, node.key, time=now // 1000)
        if now >= config.gst_ms:
            node.rounds_after_gst[height] = 0
        carry_out(node, node.voting.start())
        pending, node.buffered = node.buffered, []
        for message in pending:
            deliver(node, message)

    def carry_out(node: SimulatedNode, actions: list[Action]) -> None:
        voting = node.voting
        assert voting is not None
        for action in actions:
            if isinstance(action, Broadcast):
                node.saved = voting.signer_state()
                message = action.message
                if node.fault == "invalid" and isinstance(message, Vote):
                    message = replace(message, block_hash=new_block(node, message.height, message.round, "x", False))
                if message not in node.signed:
                    node.signed.append(message)
                if node.fault == "equivocate":
                    half = len(nodes) // 2
                    order = nodes[:]
                    rng.shuffle(order)
                    send(node, message, order[:half])
                    send(node, conflicting(message, node), order[half:])
                elif node.fault != "silent":
                    send(node, message, nodes)
            elif isinstance(action, ProposeValue):
                valid = node.fault != "invalid"
                block = new_block(node, action.height, action.round, "value", valid)
                carry_out(node, voting.on_value(action.round, block))
            elif isinstance(action, CheckBlock):
                if action.block_hash in valid_blocks or action.block_hash in invalid_blocks:
                    schedule(now + config.check_ms, node, ("checked", action.block_hash))
            elif isinstance(action, ScheduleTimeout):
                schedule(now + action.milliseconds, node, action.timeout)
            elif isinstance(action, Decide):
                if node.fault != "silent":
                    send_commit(node, action.commit)
                decide(node, action.commit)
            elif isinstance(action, Equivocation):
                evidence.append(action)

    def decide(node: SimulatedNode, commit: Commit) -> None:
        node.decisions[commit.height] = commit
        node.decided_at[commit.height] = now
        if commit.height < config.heights:
            start_height(node, commit.height + 1)

    def receive(node: SimulatedNode, message: Proposal | Vote) -> None:
        """A message arrives: relayed once (by an honest node), then handled."""
        index = nodes.index(node)
        if message in relayed[index]:
            return
        relayed[index].add(message)
        if node.fault is None:  # gossip: an honest node relays what it receives (and serves it to a late node)
            send(node, message, nodes)
        deliver(node, message)

    def deliver(node: SimulatedNode, message: Proposal | Vote) -> None:
        voting = node.voting
        assert voting is not None
        if node.fault == "forgetful":
            voting.locked_value, voting.locked_round = None, -1
        if message.height > voting.height:
            node.buffered.append(message)
            return
        if message.height < voting.height:
            return
        voting.on_tick(now // 1000)
        if isinstance(message, Proposal):
            carry_out(node, voting.on_proposal(message))
        else:
            carry_out(node, voting.on_vote(message))

    def restart(node: SimulatedNode) -> None:
        """The node crashes and comes back from its saved signer state (its messages received are lost)."""
        relayed[nodes.index(node)].clear()
        voting = node.voting
        assert voting is not None
        if node.saved is None or node.saved.height != voting.height:
            node.voting = HeightVoting(voting.height, validators, config.timeouts, node.key, time=now // 1000)
        else:
            node.voting = HeightVoting.resume(node.saved, validators, config.timeouts, node.key)
            node.voting.on_tick(now // 1000)
        carry_out(node, node.voting.start())
        height = node.voting.height
        for message in received[nodes.index(node)]:
            if message.height == height:
                schedule(now + delay(), node, message)

    restarts_left = config.restarts
    for node in nodes:
        if node.fault == "stopped":
            schedule(config.stopped_until_ms, node, "start")
        elif node.fault != "silent":
            start_height(node, 1)

    while queue:
        at, _, index, event = heapq.heappop(queue)
        if at > config.limit_ms:
            break
        now = at
        node = nodes[index]
        if event == "start":
            node.fault = None
            start_height(node, 1)
            for message in received[index]:
                schedule(now + delay(), node, message)
            continue
        if node.voting is None or node.fault == "silent":
            continue
        if all(len(n.decisions) >= config.heights for n in nodes if n.fault is None):
            break
        if node.fault is None and restarts_left and rng.randrange(100) == 0:
            restarts_left -= 1
            restart(node)
        if now >= config.gst_ms:
            node.rounds_after_gst.setdefault(node.voting.height, node.voting.round)
        if isinstance(event, Timeout):
            node.voting.on_tick(now // 1000)
            carry_out(node, node.voting.on_timeout(event))
        elif isinstance(event, Commit):
            if event.height == node.voting.height:
                carry_out(node, node.voting.on_commit(event))
        elif isinstance(event, tuple):
            _, block = event
            assert isinstance(block, bytes)
            if node.voting is not None:
                carry_out(node, node.voting.on_block_checked(block, block in valid_blocks))
        else:
            assert isinstance(event, Proposal | Vote)
            receive(node, event)
    return NetworkRun(nodes, validators, evidence, now, invalid_blocks)


def conflicting_signatures(signed: list[Proposal | Vote]) -> list[tuple[Proposal | Vote, Proposal | Vote]]:
    """Pairs of messages one signer signed that conflict: same height, round and type, different content."""
    seen: dict[tuple[int, int, int], Proposal | Vote] = {}
    pairs = []
    for message in signed:
        kind = 0 if isinstance(message, Proposal) else int(message.kind)
        key = (message.height, message.round, kind)
        first = seen.setdefault(key, message)
        if first.block_hash != message.block_hash or (
            isinstance(first, Proposal) and isinstance(message, Proposal) and first.valid_round != message.valid_round
        ):
            pairs.append((first, message))
    return pairs


def is_commit_certificate(commit: Commit, validators: ValidatorSet) -> bool:
    """Precommits for the commit's block, in its round, from a quorum of distinct validators."""
    votes = commit.precommits()
    distinct = {vote.validator for vote in votes}
    return (
        len(distinct) == len(votes)
        and all(vote.kind == VoteKind.PRECOMMIT for vote in votes)
        and validators.is_quorum(validators.stake_of(distinct))
    )
