"""A node's voting (p2p/voting.py) end to end, in one process: four validator
nodes, each with its own decided chain, signer record and LevelDB store, the
devnet model, a real miner, real signatures and evaluations; messages pass
between them through their own checks. Heights are decided with and without
training blocks, every node stores the same chain, and a node restarted in
the middle of a height resumes from its signer record without signing
anything that conflicts."""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chain.blocks import Block, DecidedBody
from chain.crypto import PrivateKey, devnet_key
from chain.heldout import Shard
from chain.store import ChainDB
from chain.votes import Commit, Proposal, Vote, sign_vote
from consensus.decided_chain import DecidedChain
from consensus.rules import StaleBlock
from consensus.voting import TimeoutParameters
from p2p.signer import SignerRecord, check_signable
from p2p.voting import BuildBlock, CheckCandidate, Decided, Effect, NodeVoting, Send, SetTimer
from tests.chain_builders import Scenario, devnet_test_shard

TIMEOUTS = TimeoutParameters(3000, 1000, 1000, 500)


@dataclass
class Member:
    name: str
    voting: NodeVoting
    db: ChainDB
    directory: Path
    key: PrivateKey
    sent: list[Proposal | Vote] = field(default_factory=list)


@dataclass
class Network:
    """Four nodes; time in milliseconds; every message takes `delay` to arrive."""

    scenario: Scenario
    members: list[Member]
    delay: int = 50
    now: int = 0
    queue: list[tuple[int, int, int, object]] = field(default_factory=list)
    sequence: int = 0

    def schedule(self, at: int, index: int, event: object) -> None:
        self.sequence += 1
        heapq.heappush(self.queue, (at, self.sequence, index, event))

    def carry_out(self, index: int, effects: list[Effect]) -> None:
        member = self.members[index]
        for effect in effects:
            if isinstance(effect, Send):
                if not isinstance(effect.message, Commit):
                    member.sent.append(effect.message)
                for other in range(len(self.members)):
                    if other != index:
                        self.schedule(self.now + self.delay, other, effect.message)
            elif isinstance(effect, SetTimer):
                self.schedule(self.now + effect.milliseconds, index, effect)
            elif isinstance(effect, CheckCandidate):
                self.schedule(self.now + 10, index, effect)
            elif isinstance(effect, BuildBlock):
                self.schedule(self.now + 1, index, effect)
            elif isinstance(effect, Decided):
                decision = effect.decision
                assert decision.commit is not None
                member.db.import_decision(decision.block, decision.state, decision.commit, decision.training_blocks)

    def fetch(self, block_hash: bytes) -> tuple[Block, dict[bytes, Block]] | None:
        """A candidate block from whichever node holds it (as sync's `block` request would)."""
        for member in self.members:
            found = member.voting.decided.candidate_blocks.get(block_hash)
            if found is not None:
                return found
        return None

    def step(self) -> None:
        at, _, index, event = heapq.heappop(self.queue)
        self.now = at
        member = self.members[index]
        member.voting.on_tick(self.scenario.node.genesis.timestamp + at // 1000)
        if isinstance(event, SetTimer):
            self.carry_out(index, member.voting.on_timeout(event.validator, event.timeout))
        elif isinstance(event, BuildBlock):
            if event.height == member.voting.height:
                block = member.voting.build_block(event.validator)
                self.carry_out(index, member.voting.on_value(event.validator, event.round, block))
        elif isinstance(event, CheckCandidate):
            found = self.fetch(event.block_hash)
            if found is None:
                return
            block, training = found
            try:
                member.voting.decided.on_candidate(block, training)
                valid = True
            except Exception:
                valid = False
            self.carry_out(index, member.voting.on_block_checked(event.block_hash, valid))
        elif isinstance(event, Proposal | Vote | Commit):
            self.carry_out(index, member.voting.on_message(event))

    def run_until(self, height: int, limit_ms: int = 600_000) -> None:
        while any(m.voting.height <= height for m in self.members):
            assert self.queue and self.now < limit_ms, [m.voting.height for m in self.members]
            self.step()

    def mine(self) -> Block:
        """A training block on the (common) head, given to every node as gossip would."""
        decided = self.members[0].voting.decided
        block = self.scenario.valid_training_block(decided.head.block, decided.head.state)
        for member in self.members:
            member.voting.decided.on_training_block(block)
        return block


def shards_of(keys: list[PrivateKey]) -> dict[bytes, Shard]:
    """The devnet held-out shards of these validator keys."""
    shards = {key.public_key: devnet_test_shard(key.public_key) for key in keys}
    return {address: shard for address, shard in shards.items() if shard is not None}


def keep_nothing(block_hash: bytes) -> None:
    """These nodes' candidates live in memory only: a restarted one fetches them from the
    others (`Network.fetch`); tests/test_locked_block.py keeps them on disk."""


def make_member(scenario: Scenario, directory: Path, key: PrivateKey) -> Member:
    genesis, state = scenario.genesis()
    decided = DecidedChain.from_genesis(scenario.chain, genesis, state)
    decided.on_tick(genesis.header.timestamp + 10**6)
    directory.mkdir(parents=True, exist_ok=True)
    db = ChainDB(directory / "chain", bytes.fromhex(scenario.node.genesis.hash), genesis, state)
    record = SignerRecord.open(directory / "signer")
    voting = NodeVoting(decided, {key.public_key: key}, record, TIMEOUTS, keep_nothing, shards=shards_of([key]))
    return Member(directory.name, voting, db, directory, key)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    scenario = Scenario.create(tmp_path / "builder")
    members = [make_member(scenario, tmp_path / f"node{i}", key) for i, key in enumerate(scenario.validators)]
    net = Network(scenario, members)
    yield net
    for member in net.members:
        member.db.close()
    scenario.node.close()


def test_heights_decide_with_and_without_updates_and_every_store_agrees(network: Network) -> None:
    training = network.mine()
    for index, member in enumerate(network.members):
        network.carry_out(index, member.voting.start(network.scenario.node.genesis.timestamp))
    network.run_until(1)
    network.run_until(2)  # no training block at height 2
    heads = {m.db.head() for m in network.members}
    assert len(heads) == 1
    db = network.members[0].db
    first, second = db.block(db.canonical_hash(1) or b""), db.block(db.canonical_hash(2) or b"")
    assert isinstance(first.body, DecidedBody) and [v.training_block for v in first.body.training] == [training.hash]
    assert isinstance(second.body, DecidedBody) and second.body.training == ()
    assert second.body.last_commit == db.commit(first.hash)
    assert second.header.timestamp >= first.header.timestamp
    assert db.block(training.hash) == training
    for member in network.members:
        assert member.db.commit(second.hash) is not None
        assert check_conflicts(member.sent) == []


def check_conflicts(sent: list[Proposal | Vote]) -> list[str]:
    problems = []
    seen: dict[tuple[int, int, int], Proposal | Vote] = {}
    for message in sent:
        key = (message.height, message.round, 0 if isinstance(message, Proposal) else int(message.kind))
        first = seen.setdefault(key, message)
        if first.block_hash != message.block_hash:
            problems.append(f"{first} / {message}")
    return problems


def test_a_node_restarted_in_the_middle_of_a_height_resumes_without_conflicts(network: Network) -> None:
    network.mine()
    for index, member in enumerate(network.members):
        network.carry_out(index, member.voting.start(network.scenario.node.genesis.timestamp))
    # Run until node 0 has signed something at height 1, then restart it from its record.
    while not network.members[0].sent:
        network.step()
    old = network.members[0]
    record = SignerRecord.open(old.directory / "signer")
    saved = record.load(old.key.public_key)
    assert saved is not None and saved.height == 1
    genesis, state = network.scenario.genesis()
    decided = DecidedChain.from_genesis(network.scenario.chain, genesis, state)
    decided.on_tick(genesis.header.timestamp + 10**6)
    for block in old.voting.decided.training.values():
        decided.on_training_block(block)
    old.voting = NodeVoting(
        decided, {old.key.public_key: old.key}, record, TIMEOUTS, keep_nothing, shards=shards_of([old.key])
    )
    network.carry_out(0, old.voting.start(genesis.header.timestamp))
    for message in old.sent:
        check_signable(saved, message)
    network.run_until(1)
    assert len({m.db.head() for m in network.members}) == 1
    assert check_conflicts(old.sent) == []
    assert devnet_key("validator-0").public_key == old.key.public_key


def test_a_miner_publishing_a_fresh_valid_variant_every_second_cannot_freeze_the_height(network: Network) -> None:
    """The wave-1 freeze: each new candidate restarted the validators' quiet timer. Here
    training blocks are only the proposal's inputs: a variant arriving every simulated
    second changes nothing about when the height is decided."""
    decided = network.members[0].voting.decided
    genesis, state = decided.head.block, decided.head.state
    variants = [
        network.scenario.valid_training_block(genesis, state, timestamp=genesis.header.timestamp + 10 + i)
        for i in range(6)
    ]
    assert len({v.hash for v in variants}) == len(variants)
    network.delay = 700  # voting spans seconds, so the variants arrive while it goes on
    arrived = 0
    for index, member in enumerate(network.members):
        member.voting.decided.on_training_block(variants[0])
        network.carry_out(index, member.voting.start(network.scenario.node.genesis.timestamp))
    for second, variant in enumerate(variants[1:], 1):
        for index in range(len(network.members)):
            network.schedule(second * 1000, index, variant)
    while any(m.voting.height <= 1 for m in network.members):
        at, _, index, event = network.queue[0]
        if isinstance(event, Block):
            heapq.heappop(network.queue)
            network.now = at
            with contextlib.suppress(StaleBlock):
                network.members[index].voting.decided.on_training_block(event)
                arrived += 1
            continue
        network.step()
    decision = network.members[0].voting.decided.head
    assert decision.commit is not None and decision.commit.round == 0
    assert arrived >= 2 * len(network.members)  # at least two variants reached every node while it voted
    assert len({m.db.head() for m in network.members}) == 1


def test_without_any_miner_heights_go_on_deciding(network: Network) -> None:
    """A network whose miners cannot meet the difficulty (here: none mines) keeps deciding heights."""
    for index, member in enumerate(network.members):
        network.carry_out(index, member.voting.start(network.scenario.node.genesis.timestamp))
    network.run_until(3)
    db = network.members[0].db
    for height in (1, 2, 3):
        block = db.block(db.canonical_hash(height) or b"")
        assert isinstance(block.body, DecidedBody) and block.body.training == ()
    assert len({m.db.head() for m in network.members}) == 1


def test_an_equivocating_validator_is_slashed_by_the_next_decided_block(network: Network) -> None:
    """Validator 3 signs a second prevote (nil) beside its real one at height 1: the
    others keep the evidence, the next proposer includes it, and its stake goes to 0."""
    offender = network.members[3].key
    domain = network.scenario.chain.domain
    for index, member in enumerate(network.members):
        network.carry_out(index, member.voting.start(network.scenario.node.genesis.timestamp))
    while not any(isinstance(m, Vote) for m in network.members[3].sent):
        network.step()
    real = next(m for m in network.members[3].sent if isinstance(m, Vote))
    other = None if real.block_hash is not None else bytes(32)
    twin = sign_vote(offender, domain, dataclasses.replace(real, block_hash=other, signature=b""))
    for index in range(3):
        network.schedule(network.now + 1, index, twin)
    network.run_until(2)
    db = network.members[0].db
    second = db.block(db.canonical_hash(2) or b"")
    assert isinstance(second.body, DecidedBody)
    assert [e.first.validator if isinstance(e.first, Vote) else b"" for e in second.body.evidence] == [
        offender.public_key
    ]
    assert db.state(second.hash).stake_of(offender.public_key) == 0
    network.run_until(3)  # the three others decide on


def test_one_node_holding_every_key_decides_with_signed_certificates(tmp_path: Path) -> None:
    """All four validator keys in one node: its machines see each other's messages at once, so a
    machine can reach its quorum on its own precommit before the loop that signs it went on; the
    certificate must still carry only signed precommits (it once carried an unsigned one)."""
    scenario = Scenario.create(tmp_path / "builder")
    member = make_member(scenario, tmp_path / "node", scenario.validators[0])
    keys = {key.public_key: key for key in scenario.validators}
    record = SignerRecord.open(tmp_path / "node" / "all")
    member.voting = NodeVoting(
        member.voting.decided, keys, record, TIMEOUTS, keep_nothing, shards=shards_of(list(keys.values()))
    )
    network = Network(scenario, [member])
    try:
        network.mine()
        network.carry_out(0, member.voting.start(scenario.node.genesis.timestamp))
        network.run_until(3)
        for height in (1, 2, 3):
            block_hash = member.db.canonical_hash(height)
            assert block_hash is not None
            commit = member.db.commit(block_hash)
            assert commit is not None and all(signature for _, _, signature in commit.signatures)
        first = member.db.block(member.db.canonical_hash(1) or b"")
        assert isinstance(first.body, DecidedBody) and len(first.body.training) == 1
    finally:
        member.db.close()
        scenario.node.close()
