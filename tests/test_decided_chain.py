"""The decided chain (consensus/decided_chain.py): one block per height, final
with its certificate; invalid input changes nothing; checked candidates are
remembered; a sibling of a decided block can never replace it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.blocks import Block
from chain.crypto import PrivateKey
from chain.store import ChainDB
from chain.votes import Commit, Vote, VoteKind, sign_vote
from consensus.decided_chain import DecidedChain
from consensus.decisions import propose_decided_block
from consensus.rules import InvalidBlock, StaleBlock, UnknownParent
from tests.chain_builders import Scenario, devnet_test_shard, rebuild


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    scenario = Scenario.create(tmp_path_factory.mktemp("decided"))
    yield scenario
    scenario.node.close()


def certificate(scenario: Scenario, block: Block, keys: list[PrivateKey]) -> Commit:
    domain, height = scenario.chain.domain, block.header.height
    return Commit.of(
        [
            sign_vote(
                k, domain, Vote(VoteKind.PRECOMMIT, height, 0, block.hash, block.header.timestamp + 3, k.public_key)
            )
            for k in keys
        ]
    )


def fresh_chain(scenario: Scenario) -> DecidedChain:
    genesis, state = scenario.genesis()
    decided = DecidedChain.from_genesis(scenario.chain, genesis, state)
    decided.on_tick(genesis.header.timestamp + 10**6)
    return decided


def snapshot(decided: DecidedChain) -> tuple[object, ...]:
    return (decided.head, decided.head_validators, dict(decided.training), dict(decided.candidates))


def test_heights_are_decided_one_by_one_and_never_replaced(scenario: Scenario) -> None:
    decided = fresh_chain(scenario)
    genesis, state = decided.head.block, decided.head.state
    training = scenario.valid_training_block(genesis, state)
    assert decided.on_training_block(training) and not decided.on_training_block(training)
    assert decided.get_best_training_block() == training
    proposers = scenario.validators
    first = propose_decided_block(
        scenario.chain,
        genesis,
        state,
        proposers[0],
        [training],
        None,
        None,
        (),
        devnet_test_shard(proposers[0].public_key),
    )
    sibling = propose_decided_block(scenario.chain, genesis, state, proposers[1], [], None, None, ())
    known = {training.hash: training}
    decided.on_candidate(first, known)
    decided.on_candidate(sibling, {})  # both valid candidates for height 1

    before = snapshot(decided)
    with pytest.raises(InvalidBlock, match="stake 2000000 of 4000000"):
        decided.on_decided(first, certificate(scenario, first, proposers[:2]), known)
    assert snapshot(decided) == before  # a short certificate changes nothing

    decision = decided.on_decided(first, certificate(scenario, first, proposers[:3]), known)
    assert decided.head == decision and decided.height == 2 and decision.training_blocks == (training,)
    assert decided.training == {} and decided.candidates == {}
    # The sibling can never be decided now, even with a certificate: height 1 is final.
    with pytest.raises(StaleBlock):
        decided.on_decided(sibling, certificate(scenario, sibling, proposers), {})
    with pytest.raises(StaleBlock):
        decided.on_training_block(training)  # built on genesis: stale
    assert decided.head == decision

    # Height 2 decides without an update.
    commit = decision.commit
    assert commit is not None
    second = propose_decided_block(
        scenario.chain, first, decision.state, proposers[2], [], commit, decided.head_validators, ()
    )
    decided.on_decided(second, certificate(scenario, second, proposers[1:]), {})
    assert decided.height == 3 and decided.head.state.weights_root == decision.state.weights_root


def test_invalid_input_changes_nothing_and_an_invalid_candidate_is_checked_once(scenario: Scenario) -> None:
    decided = fresh_chain(scenario)
    genesis, state = decided.head.block, decided.head.state
    training = scenario.valid_training_block(genesis, state)
    before = snapshot(decided)
    broken = dataclasses.replace(training, signature=bytes(64))
    with pytest.raises(InvalidBlock, match="signature"):
        decided.on_training_block(broken)
    orphan = scenario.build_training_block(genesis, state, parent=bytes(32), height=5)
    with pytest.raises(UnknownParent):
        decided.on_training_block(orphan)
    future = scenario.build_training_block(genesis, state, timestamp=decided.time + 10**4)
    with pytest.raises(InvalidBlock, match="future"):
        decided.on_training_block(future)
    assert snapshot(decided) == before

    bad = propose_decided_block(scenario.chain, genesis, state, scenario.validators[0], [], None, None, ())
    bad = dataclasses.replace(bad, signature=bytes(64))
    with pytest.raises(InvalidBlock, match="signature"):
        decided.on_candidate(bad, {})
    with pytest.raises(InvalidBlock, match="checked before"):
        decided.on_candidate(bad, {})
    with pytest.raises(InvalidBlock, match="want DECIDED"):
        decided.on_candidate(training, {})


def test_a_decision_is_stored_in_one_batch_and_reads_back(scenario: Scenario, tmp_path: Path) -> None:
    decided = fresh_chain(scenario)
    genesis, state = decided.head.block, decided.head.state
    training = scenario.valid_training_block(genesis, state)
    block = propose_decided_block(
        scenario.chain, genesis, state, scenario.validators[0], [training], None, None, (),
        devnet_test_shard(scenario.validators[0].public_key),
    )  # fmt: skip
    decision = decided.on_decided(block, certificate(scenario, block, scenario.validators), {training.hash: training})
    assert decision.commit is not None
    genesis_hash = bytes.fromhex(scenario.node.genesis.hash)
    db = ChainDB(tmp_path / "chain", genesis_hash, genesis, state)
    db.import_decision(decision.block, decision.state, decision.commit, decision.training_blocks)
    db.close()
    reopened = ChainDB(tmp_path / "chain", genesis_hash, genesis, state)
    try:
        assert reopened.head() == reopened.finalized() == block.hash == reopened.canonical_hash(1)
        assert reopened.commit(block.hash) == decision.commit and reopened.commit(genesis.hash) is None
        assert reopened.block(training.hash) == training and reopened.block(block.hash) == block
        assert reopened.state(block.hash).root == decision.state.root
    finally:
        reopened.close()


def test_a_re_signed_variant_never_displaces_the_block_kept_first(scenario: Scenario) -> None:
    """Equal claimed gains tie-break on the order kept, not on the hash: a miner re-signing its
    block every second cannot make each new variant the proposer's choice (validators would have
    to fetch every one)."""
    decided = fresh_chain(scenario)
    genesis, state = decided.head.block, decided.head.state
    original = scenario.valid_training_block(genesis, state)
    assert decided.on_training_block(original)
    variants = [
        rebuild(original, scenario.miner, scenario.chain.domain, timestamp=original.header.timestamp + offset)
        for offset in range(1, 9)
    ]
    lower = [variant for variant in variants if variant.hash < original.hash]
    assert lower, "no variant with a lower hash among eight: the tie-break went untested"
    for variant in variants:
        assert decided.on_training_block(variant)
    assert decided.get_best_training_block() == original
