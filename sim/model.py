"""The modeled network: the real rules' blocks, a modeled network, 1,000 nodes on one machine.

Two parts:

1. **The chain, made by the real rules.** Heights are decided as the node
   decides them (docs/spec.md, sections 15 and 16): the reference miner
   trains a training block on the decided head; the height's round-0
   proposer (`compute_proposer_order`) builds the decided block naming it
   (its ECVRF-seeded test included); the devnet validators sign precommits
   and the commit certificate decides it. Each block's encoded size, the
   time a fresh node takes to check it (`DecidedChain.on_training_block`,
   `on_candidate`) and the canonical evaluations that costs are measured.
2. **The network, modeled** as a discrete-event simulation: `nodes` nodes,
   each with `degree` random peers (the gossip mesh); a link's latency is
   drawn around `latency_ms` (lognormal, fixed per link); a node's bandwidth
   is `bandwidth_mbps`. As in the real node, a block travels as an
   announcement, the receiver fetches the body from the peer that announced
   it and checks it (the measured time, one at a time per node) before
   announcing it further. The validators, on random nodes, run the real
   voting machines (`HeightVoting`): the proposer's block reaches them by
   gossip, each checks it and prevotes, votes travel the shortest paths
   between validators, and a height is decided by the machines' own rules;
   every other node decides once the decided block and its certificate
   reach it. The miner starts the next height once its node has decided.

It reports per-block propagation times (production to each node's checked
copy), finality lag (training block produced to each node holding its
decided block), the height times, the rounds each height took, and the
canonical evaluations a node runs per height.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chain.blocks import Block, TrainingBody
from chain.crypto import devnet_key
from chain.heldout import Shard
from chain.votes import Commit, Proposal, Vote, VoteKind, sign_vote
from consensus.decided_chain import DecidedChain
from consensus.decisions import propose_decided_block
from consensus.genesis import Genesis, compute_timeouts
from consensus.proposals import propose_best_training_block
from consensus.rules import Chain, compute_assigned_slice, compute_training_seed, genesis_block, genesis_state
from consensus.voting import (
    Broadcast,
    CheckBlock,
    Decide,
    HeightVoting,
    ProposeValue,
    ScheduleTimeout,
    Timeout,
    TimeoutParameters,
    ValidatorSet,
    compute_proposer_order,
)
from training.miner import Miner, TrainingConfig

VOTE_BYTES = 200
"""A signed vote or proposal on the wire."""
VOTE_CHECK_SECONDS = 0.0002
"""Checking one vote's signature."""


@dataclass(frozen=True)
class ModelConfig:
    nodes: int = 1000
    degree: int = 8
    """Peers per node (GossipSub's mesh degree is 6 to 12)."""
    latency_ms: float = 1.3
    """Median one-way link latency; the default is loopback's, measured between node processes."""
    bandwidth_mbps: float = 1000.0
    rounds: int = 6
    """Heights to decide (each with a training block)."""
    steps: int = 10
    """The miner's optimizer steps per block (real training, in this process)."""
    seed: int = 1


@dataclass
class MeasuredBlock:
    """A block the real rules made, with what it cost."""

    block: Block
    size: int
    """Encoded bytes."""
    validate_seconds: float
    """Time a fresh node took to check it."""
    produce_seconds: float
    """The time to make it (training and proofs; building a decided block)."""
    evaluations: int
    """Canonical evaluations a fresh node ran to check it."""


@dataclass
class Height:
    """One decided height, made by the real rules."""

    training: MeasuredBlock
    decided: MeasuredBlock
    stakes: dict[bytes, int]
    """The validators' stakes at this height."""


def make_chain(
    chain: Chain, train_text: bytes, config: ModelConfig, say: Callable[[str], None], shards: Mapping[bytes, Shard]
) -> list[Height]:
    """Decide `rounds` heights through the real rules, timing each step (validators test
    on their held-out `shards`)."""
    genesis = chain.genesis
    state = genesis_state(genesis)
    decided = DecidedChain.from_genesis(chain, genesis_block(genesis, state), state)
    miner_key = devnet_key(f"model-{config.seed}-miner")
    validators = {k.public_key: k for k in (devnet_key(f"validator-{i}") for i in range(len(genesis.accounts)))}
    validators = {address: key for address, key in validators.items() if state.stake_of(address) > 0}
    miner = Miner(chain.weights(state), chain.layout, train_text, TrainingConfig(steps=config.steps))
    heights: list[Height] = []
    attempt = 0
    fresh = Chain(genesis, chain.validation_text, chain.test_text, chain.backend)
    fresh.loss(state, "validation", bytes(32))  # builds the evaluation tables once, outside the timings
    warm = False  # the first height's timings include one-off compilation: it is decided, then measured again
    while len(heights) < config.rounds:
        head = decided.head
        parent = head.block
        slice_id = compute_assigned_slice(parent.header, genesis.partition.slices)
        seed = compute_training_seed(parent.hash, miner_key.public_key) + attempt.to_bytes(4, "big")
        started = time.perf_counter()
        work = miner.work(chain.weights(head.state), slice_id, seed)
        timestamp = parent.header.timestamp + genesis.consensus.target_interval_seconds
        training = propose_best_training_block(chain, parent, head.state, miner_key, work.values, timestamp, work.steps)
        produce = time.perf_counter() - started
        assert isinstance(training.body, TrainingBody)
        attempt += 1
        if training.body.loss_before - training.body.loss_after < head.state.difficulty:
            continue
        attempt = 0
        decided.on_tick(timestamp + 1)
        decided.on_training_block(training)
        validator_set = decided.validators()
        proposer = validators[compute_proposer_order(validator_set, decided.height)[0]]
        started = time.perf_counter()
        block = propose_decided_block(
            chain, parent, head.state, proposer, [training], head.commit, decided.head_validators, (),
            shards.get(proposer.public_key),
        )  # fmt: skip
        build = time.perf_counter() - started
        # A fresh node checks the training block as gossip brings it, then the proposal.
        checker = DecidedChain(fresh, head, decided.head_validators)
        checker.on_tick(timestamp + 1)
        fresh.forget_losses()
        before = fresh.evaluations
        started = time.perf_counter()
        checker.on_training_block(training)
        validate_training = time.perf_counter() - started
        training_evaluations = fresh.evaluations - before
        started = time.perf_counter()
        checker.on_candidate(block, {training.hash: training})
        validate_decided = time.perf_counter() - started
        decided_evaluations = fresh.evaluations - before - training_evaluations
        commit = Commit.of([
            sign_vote(key, chain.domain, Vote(VoteKind.PRECOMMIT, block.header.height, 0, block.hash,
                                              block.header.timestamp + 1, address))
            for address, key in validators.items()
        ])  # fmt: skip
        decided.on_decided(block, commit, {training.hash: training})
        if not warm:
            warm = True
            say(f"real rules: a warm-up height ({produce:.2f} s, checked in {validate_training:.3f} s), not measured")
            continue
        heights.append(Height(
            MeasuredBlock(training, len(training.encode()), validate_training, produce, training_evaluations),
            MeasuredBlock(block, len(block.encode()) + len(commit.encode()), validate_decided, build,
                          decided_evaluations),
            dict(validator_set.stakes),
        ))  # fmt: skip
        say(
            f"real rules: height {len(heights)}/{config.rounds}: training block {training.header.height} "
            f"({len(training.encode())} bytes, produced in {produce:.2f} s, checked in {validate_training:.3f} s), "
            f"decided block checked in {validate_decided:.3f} s"
        )
    return heights


@dataclass
class Network:
    """The modeled network: a random graph with per-link latencies."""

    config: ModelConfig
    rng: random.Random
    peers: list[list[int]] = field(default_factory=list)
    latency: dict[tuple[int, int], float] = field(default_factory=dict)

    @classmethod
    def build(cls, config: ModelConfig) -> Network:
        network = cls(config, random.Random(config.seed))
        count = config.nodes
        links: set[tuple[int, int]] = set()
        order = list(range(count))
        for node in range(count):  # a ring keeps the graph connected; random links make it an expander
            links.add((min(node, (node + 1) % count), max(node, (node + 1) % count)))
        while len(links) < count * config.degree // 2:
            a, b = network.rng.sample(order, 2)
            links.add((min(a, b), max(a, b)))
        network.peers = [[] for _ in range(count)]
        sigma = 0.5
        for a, b in links:
            network.peers[a].append(b)
            network.peers[b].append(a)
            seconds = config.latency_ms / 1000 * math.exp(network.rng.gauss(0, sigma))
            network.latency[(a, b)] = network.latency[(b, a)] = seconds
        return network

    def transfer(self, a: int, b: int, size: int) -> float:
        return self.latency[(a, b)] + size * 8 / (self.config.bandwidth_mbps * 1e6)

    def fetch(self, a: int, b: int, size: int) -> float:
        """Announcement, then a request and the body over a link."""
        announcement = 400
        return self.transfer(a, b, announcement) + self.latency[(b, a)] + self.transfer(a, b, size)


def gossip(network: Network, origin: int, start: float, size: int, validate: float, busy: list[float]) -> list[float]:
    """When each node holds a validated copy of a message produced at `origin` at `start`.

    Validate-before-relay: a node announces only once it has validated; a
    node validates one thing at a time (`busy`: when its CPU is next free)."""
    count = network.config.nodes
    done = [math.inf] * count
    done[origin] = start
    arrived = [math.inf] * count
    frontier: list[tuple[float, int]] = [(start, origin)]
    while frontier:
        at, node = heapq.heappop(frontier)
        if at > done[node]:
            continue
        for peer in network.peers[node]:
            arrival = at + network.fetch(node, peer, size)
            if arrival < arrived[peer] and arrival + validate < done[peer]:
                arrived[peer] = arrival
                done[peer] = max(arrival, busy[peer]) + validate
                heapq.heappush(frontier, (done[peer], peer))
    for node in range(count):
        if node != origin:
            busy[node] = max(busy[node], done[node])
    return done


def vote(
    network: Network, height: Height, number: int, homes: dict[bytes, int], ready: list[float], busy: list[float]
) -> tuple[dict[bytes, float], int]:
    """Run the validators' real voting machines over the modeled network.

    Each validator starts when the training block has reached its node
    (`ready`); a proposal's block is fetched from the proposer's node and
    checked (the measured time, when the node's CPU is free); votes travel
    the shortest paths between validators' nodes. Returns when each
    validator decided (seconds) and the round it was decided in."""
    quorum = ValidatorSet(height.stakes, 2, 3)
    machines = {v: HeightVoting(number, quorum, model_timeouts(height, network.config), v) for v in homes}
    queue: list[tuple[float, int, bytes, object]] = []
    sequence = 0
    decided: dict[bytes, float] = {}
    decided_round = 0
    block_hash = height.decided.block.hash
    links: dict[tuple[int, int], float] = {}

    def path(a: int, b: int) -> float:
        if (a, b) not in links:
            links[(a, b)] = shortest(network, a, b)
        return links[(a, b)]

    def push(at: float, validator: bytes, event: object) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(queue, (at, sequence, validator, event))

    def carry_out(validator: bytes, at: float, actions: list[Any]) -> None:
        nonlocal decided_round
        home = homes[validator]
        for action in actions:
            if isinstance(action, Broadcast):
                for other, other_home in homes.items():
                    if other != validator:
                        push(at + path(home, other_home) + VOTE_CHECK_SECONDS, other, action.message)
            elif isinstance(action, ProposeValue):
                push(at + height.decided.produce_seconds, validator, ("value", action.round))
            elif isinstance(action, CheckBlock):
                proposer_home = homes[compute_proposer_order(quorum, number)[0]]
                fetched = (
                    at + 2 * path(home, proposer_home) + height.decided.size * 8 / (network.config.bandwidth_mbps * 1e6)
                )
                done = max(fetched, busy[home]) + height.decided.validate_seconds
                busy[home] = done
                push(done, validator, ("checked", action.block_hash))
            elif isinstance(action, ScheduleTimeout):
                push(at + action.milliseconds / 1000, validator, action.timeout)
            elif isinstance(action, Decide):
                decided[validator] = at
                decided_round = max(decided_round, action.commit.round)

    for validator in machines:
        push(ready[homes[validator]], validator, "start")
    while queue and len(decided) < len(machines):
        at, _, validator, event = heapq.heappop(queue)
        machine = machines[validator]
        if validator in decided:
            continue
        machine.on_tick(int(at))
        if event == "start":
            actions = machine.start()
        elif isinstance(event, Timeout):
            actions = machine.on_timeout(event)
        elif isinstance(event, tuple) and event[0] == "value":
            actions = machine.on_value(event[1], block_hash)
        elif isinstance(event, tuple) and event[0] == "checked":
            actions = machine.on_block_checked(event[1], event[1] == block_hash)
        elif isinstance(event, Proposal):
            actions = machine.on_proposal(event)
        else:
            assert isinstance(event, Vote)
            actions = machine.on_vote(event)
        carry_out(validator, at, actions)
    return decided, decided_round


def model_timeouts(height: Height, config: ModelConfig) -> TimeoutParameters:
    """The timeouts genesis would fix (`compute_timeouts`) from the costs measured in this run:
    one evaluation is half a decided block's check (its two test evaluations)."""
    evaluation_ms = max(1, int(500 * height.decided.validate_seconds))
    transfer_ms = int(height.training.size * 8 / (config.bandwidth_mbps * 1000))
    fields = compute_timeouts(evaluation_ms, network_ms=100, transfer_ms=transfer_ms)
    return TimeoutParameters(
        fields["timeout_propose_ms"], fields["timeout_prevote_ms"], fields["timeout_precommit_ms"],
        fields["timeout_increment_ms"],
    )  # fmt: skip


def simulate(heights: list[Height], config: ModelConfig, say: Callable[[str], None]) -> dict[str, Any]:
    network = Network.build(config)
    rng = network.rng
    count = config.nodes
    validators = sorted(heights[0].stakes)
    homes = dict(zip(validators, rng.sample(range(1, count), len(validators)), strict=True))
    miner = 0
    busy = [0.0] * count
    clock = 0.0
    propagation: list[float] = []
    finality: list[float] = []
    height_seconds: list[float] = []
    rounds: list[int] = []
    for number, height in enumerate(heights, 1):
        produced = clock + height.training.produce_seconds
        training = gossip(network, miner, produced, height.training.size, height.training.validate_seconds, busy)
        propagation += [t - produced for n, t in enumerate(training) if n != miner]
        decided, decided_round = vote(network, height, number, homes, training, busy)
        rounds.append(decided_round)
        first = min(decided, key=lambda v: decided[v])
        # The decided block and its certificate spread from the first validator to decide.
        spread = gossip(network, homes[first], decided[first], height.decided.size,
                        height.decided.validate_seconds, busy)  # fmt: skip
        for validator, at in decided.items():
            spread[homes[validator]] = min(spread[homes[validator]], at)
        finality += [t - produced for t in spread]
        clock = spread[miner]
        height_seconds.append(clock - (produced - height.training.produce_seconds))
        say(
            f"model: height {number}/{len(heights)}: propagation p90 {percentile(propagation, 0.9):.3f} s, "
            f"decided in round {decided_round}, finality {max(spread) - produced:.2f} s at the slowest node"
        )
    return {
        "nodes": count,
        "degree": config.degree,
        "latency_ms": config.latency_ms,
        "bandwidth_mbps": config.bandwidth_mbps,
        "rounds": len(heights),
        "propagation_seconds": summary(propagation),
        "finality_lag_seconds": summary(finality),
        "round_seconds": summary(height_seconds),
        "voting_rounds_per_height": rounds,
        "evaluations_per_height_per_node": max(h.training.evaluations + h.decided.evaluations for h in heights),
        "simulated_seconds": round(clock, 2),
        "hops_diameter": diameter(network),
    }


def shortest(network: Network, a: int, b: int) -> float:
    """Least latency from a to b (a small message: the attestation's path to the proposer)."""
    best = {a: 0.0}
    queue = [(0.0, a)]
    while queue:
        at, node = heapq.heappop(queue)
        if node == b:
            return at
        if at > best.get(node, math.inf):
            continue
        for peer in network.peers[node]:
            arrival = at + network.latency[(node, peer)]
            if arrival < best.get(peer, math.inf):
                best[peer] = arrival
                heapq.heappush(queue, (arrival, peer))
    return math.inf


def diameter(network: Network) -> int:
    """Hops from node 0 to the farthest node (breadth-first)."""
    seen, frontier, hops = {0}, [0], 0
    while frontier:
        following = [p for n in frontier for p in network.peers[n] if p not in seen]
        seen.update(following)
        frontier = list(dict.fromkeys(following))
        hops += 1 if frontier else 0
    return hops


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "p90": round(percentile(values, 0.9), 4),
        "max": round(max(values), 4),
    }


def measured_view(height: Height) -> dict[str, Any]:
    """What the real rules measured for one height."""
    return {
        "height": height.decided.block.header.height,
        "training_bytes": height.training.size,
        "training_validate_seconds": round(height.training.validate_seconds, 4),
        "training_evaluations": height.training.evaluations,
        "decided_bytes": height.decided.size,
        "decided_validate_seconds": round(height.decided.validate_seconds, 4),
        "decided_evaluations": height.decided.evaluations,
        "build_seconds": round(height.decided.produce_seconds, 4),
        "produce_seconds": round(height.training.produce_seconds, 3),
    }


def run_model(genesis: Genesis, genesis_path: Path, config: ModelConfig, out: Path) -> dict[str, Any]:
    from genesis import chunk_directory
    from training.data import load_split

    def say(message: str) -> None:
        print(f"[sim] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    directory = chunk_directory(genesis_path, genesis)
    chain = Chain(genesis, load_split(genesis.dataset, directory, "validation"),
                  load_split(genesis.dataset, directory, "test"))  # fmt: skip
    from genesis import devnet_shard

    shards = {a.public_key: devnet_shard(genesis, genesis_path, a.public_key) for a in genesis.accounts}
    kept = {address: shard for address, shard in shards.items() if shard is not None}
    heights = make_chain(chain, load_split(genesis.dataset, directory, "train"), config, say, kept)
    measured = time.perf_counter() - started
    result = simulate(heights, config, say)
    result["real_rules_seconds"] = round(measured, 1)
    result["measured"] = [measured_view(h) for h in heights]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
