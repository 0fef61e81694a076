"""The modeled network: the real rules' blocks, a modeled network, 1,000 nodes on one machine.

Two parts:

1. **The chain, made by the real rules.** One in-process store mines and
   validates `rounds` rounds with the reference miner, the devnet validators'
   attestations and the real fork choice; each block's encoded size and the
   time the real `on_block` took to validate it are measured.
2. **The network, modeled** as a discrete-event simulation: `nodes` nodes,
   each with `degree` random peers (the gossip mesh); a link's latency is
   drawn around `latency_ms` (lognormal, fixed per link); a node's bandwidth
   is `bandwidth_mbps`. As in the real node, a block travels as an
   announcement, the receiver fetches the body from the peer that announced
   it (a round trip plus size over bandwidth) and validates it (the measured
   time, one block at a time per node) before announcing it further. The
   validators (on random nodes) attest after the real node's rule (the
   leader after a quiet period, the others on the leader's attestation),
   each attestation costs the evaluation time to make and again to check on
   every node that relays it, the proposer rotation and the quorum are the
   real rules' (`get_validation_proposers`, `get_quorum_stake`), and the
   miner starts the next round once it holds the validation block.

It reports per-block propagation times (production to each node's validated
copy), finality lag (training block produced to each node holding its
validation block) and the round times, like the process mode does.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chain.blocks import Block, TrainingBody
from chain.crypto import devnet_key
from consensus.fork_choice import Store
from consensus.genesis import Genesis
from consensus.proposals import (
    attest,
    get_quorum_stake,
    get_validation_proposers,
    propose_best_training_block,
    propose_validation_block,
)
from consensus.rules import Chain, compute_assigned_slice, compute_training_seed, genesis_block, genesis_state
from training.miner import Miner, TrainingConfig

ATTEST_QUIET = 1.5
"""The real validators' quiet period (p2p/service.py)."""
QUORUM_GRACE = 0.5
"""The real proposer's wait for the remaining attestations after a quorum."""


@dataclass(frozen=True)
class ModelConfig:
    nodes: int = 1000
    degree: int = 8
    """Peers per node (GossipSub's mesh degree is 6 to 12)."""
    latency_ms: float = 1.3
    """Median one-way link latency; the default is loopback's, measured between node processes."""
    bandwidth_mbps: float = 1000.0
    rounds: int = 6
    """Training blocks to finalize."""
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
    """Time the real on_block took to validate it (a fresh node's cost)."""
    produce_seconds: float
    """For a training block: the miner's time (training and proofs)."""


@dataclass
class Round:
    training: MeasuredBlock
    attestation_seconds: float
    """Time to make one attestation (and to check one)."""
    validation: MeasuredBlock
    attesters: list[bytes]
    quorum: int
    stakes: dict[bytes, int]
    proposers: list[bytes]


def make_chain(chain: Chain, train_text: bytes, config: ModelConfig, say: Callable[[str], None]) -> list[Round]:
    """Mine `rounds` rounds through the real rules, timing each step."""
    genesis = chain.genesis
    state = genesis_state(genesis)
    store = Store.from_anchor(chain, genesis_block(genesis, state), state)
    miner_key = devnet_key(f"model-{config.seed}-miner")
    validators = [devnet_key(f"validator-{i}") for i in range(len([a for a in genesis.accounts if a.stake]))]
    miner = Miner(chain.weights(state), chain.layout, train_text, TrainingConfig(steps=config.steps))
    rounds: list[Round] = []
    attempt = 0
    fresh = Chain(genesis, chain.validation_text, chain.test_text, chain.backend)
    fresh.loss(state, "validation", bytes(32))  # builds the evaluation tables once, outside the timings
    warm = False  # the first round's timings include one-off compilation: it is mined, then measured again
    while len(rounds) < config.rounds:
        parent = store.nodes[store.get_checkpoint()]
        slice_id = compute_assigned_slice(parent.block.header, miner_key.public_key, genesis.partition.slices)
        seed = compute_training_seed(parent.block.hash, miner_key.public_key) + attempt.to_bytes(4, "big")
        started = time.perf_counter()
        work = miner.work(chain.weights(parent.state), slice_id, seed)
        timestamp = parent.block.header.timestamp + genesis.consensus.target_interval_seconds
        training = propose_best_training_block(
            chain, parent.block, parent.state, miner_key, work.values, timestamp, work.steps
        )
        produce = time.perf_counter() - started
        assert isinstance(training.body, TrainingBody)
        attempt += 1
        if training.body.loss_before - training.body.loss_after < parent.state.difficulty:
            continue
        attempt = 0
        fresh.forget_losses()  # time it as a node that sees the block first
        fresh_store = Store.from_anchor(fresh, parent.block, parent.state)
        fresh_store.on_tick(timestamp + 1)
        store.on_tick(timestamp + 1)
        started = time.perf_counter()
        fresh_store.on_block(training)
        validate_training = time.perf_counter() - started
        store.on_block(training)
        started = time.perf_counter()
        attestations = [attest(chain, key, parent.state, training) for key in validators]
        attestation_seconds = (time.perf_counter() - started) / len(validators)
        proposers = get_validation_proposers(parent.state, training)
        leader = next(key for key in validators if key.public_key == proposers[0])
        validation = propose_validation_block(chain, training, parent.state, leader, attestations, [],
                                              timestamp + 1)  # fmt: skip
        for attestation in attestations:  # a node checks each attestation as it arrives by gossip ...
            fresh_store.on_attestation(attestation)
        started = time.perf_counter()
        fresh_store.on_block(validation)  # ... so the block itself then costs only what is left
        validate_validation = time.perf_counter() - started
        store.on_block(validation)
        stakes = {key.public_key: parent.state.stake_of(key.public_key) for key in validators}
        if not warm:
            warm = True
            say(f"real rules: a warm-up round ({produce:.2f} s, validated in {validate_training:.3f} s), not measured")
            continue
        rounds.append(Round(
            MeasuredBlock(training, len(training.encode()), validate_training, produce),
            attestation_seconds,
            MeasuredBlock(validation, len(validation.encode()), validate_validation, 0.0),
            [key.public_key for key in validators],
            get_quorum_stake(parent.state, chain),
            stakes,
            proposers,
        ))  # fmt: skip
        say(
            f"real rules: round {len(rounds)}/{config.rounds}: training block {training.header.height} "
            f"({len(training.encode())} bytes, produced in {produce:.2f} s, validated in {validate_training:.3f} s)"
        )
    return rounds


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


def simulate(rounds: list[Round], config: ModelConfig, say: Callable[[str], None]) -> dict[str, Any]:
    network = Network.build(config)
    rng = network.rng
    count = config.nodes
    validators = rounds[0].attesters
    homes = dict(zip(validators, rng.sample(range(1, count), len(validators)), strict=True))
    miner = 0
    busy = [0.0] * count
    clock = 0.0
    propagation: list[float] = []
    finality: list[float] = []
    round_seconds: list[float] = []
    for number, round_ in enumerate(rounds, 1):
        produced = clock + round_.training.produce_seconds
        training = gossip(network, miner, produced, round_.training.size, round_.training.validate_seconds, busy)
        this_round = [t - produced for n, t in enumerate(training) if n != miner]
        propagation += this_round
        # Validators: the leader after the quiet period, the others once the leader's attestation reaches them.
        leader = round_.proposers[0]
        leader_home = homes[leader]
        leader_done = training[leader_home] + ATTEST_QUIET + round_.attestation_seconds
        leader_attestation = gossip(network, leader_home, leader_done, 300, round_.attestation_seconds, busy)
        made = {leader: leader_done}
        for validator in validators:
            if validator != leader:
                home = homes[validator]
                made[validator] = max(training[home], leader_attestation[home]) + round_.attestation_seconds
        # The proposer (the leader) collects attestations until the quorum is in.
        proposer_home = leader_home
        arrivals = sorted(
            (made[v] if homes[v] == proposer_home else made[v] + shortest(network, homes[v], proposer_home), v)
            for v in validators
        )
        stake, quorum_time = 0, math.inf
        for at, validator in arrivals:
            stake += round_.stakes[validator]
            if stake >= round_.quorum:
                quorum_time = at
                break
        everyone = arrivals[-1][0]
        propose_at = max(quorum_time, min(everyone, quorum_time + QUORUM_GRACE))
        validation = gossip(network, proposer_home, propose_at, round_.validation.size,
                            round_.validation.validate_seconds, busy)  # fmt: skip
        finality += [t - produced for t in validation]
        clock = validation[miner]
        round_seconds.append(clock - (produced - round_.training.produce_seconds))
        say(
            f"model: round {number}/{len(rounds)}: propagation p90 {percentile(propagation, 0.9):.3f} s, "
            f"finality {max(validation) - produced:.2f} s at the slowest node"
        )
    return {
        "nodes": count,
        "degree": config.degree,
        "latency_ms": config.latency_ms,
        "bandwidth_mbps": config.bandwidth_mbps,
        "rounds": len(rounds),
        "propagation_seconds": summary(propagation),
        "finality_lag_seconds": summary(finality),
        "round_seconds": summary(round_seconds),
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


def measured_view(round_: Round) -> dict[str, Any]:
    """What the real rules measured for one round."""
    return {
        "height": round_.training.block.header.height,
        "training_bytes": round_.training.size,
        "training_validate_seconds": round(round_.training.validate_seconds, 4),
        "validation_bytes": round_.validation.size,
        "validation_validate_seconds": round(round_.validation.validate_seconds, 4),
        "attestation_seconds": round(round_.attestation_seconds, 4),
        "produce_seconds": round(round_.training.produce_seconds, 3),
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
    rounds = make_chain(chain, load_split(genesis.dataset, directory, "train"), config, say)
    measured = time.perf_counter() - started
    result = simulate(rounds, config, say)
    result["real_rules_seconds"] = round(measured, 1)
    result["measured"] = [measured_view(r) for r in rounds]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
