"""One test per training block rule: each block breaks exactly that rule, is
rejected with its reason, and leaves the node as it was (its database byte
for byte, and the training blocks it keeps). The decided block's rules are
tests/test_decisions.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from chain.blocks import Block, TrainingBody
from chain.crypto import devnet_key
from chain.state import State
from consensus.proposals import propose_training_block
from consensus.rules import (
    InvalidBlock,
    apply_training_block,
    compute_assigned_slice,
    compute_next_slice,
    compute_validation_seed,
)
from tests.chain_builders import Scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    scenario = Scenario.create(tmp_path_factory.mktemp("rules"))
    yield scenario
    scenario.node.close()


@pytest.fixture(scope="module")
def genesis(scenario: Scenario) -> tuple[Block, State]:
    return scenario.genesis()


@pytest.fixture(scope="module")
def training(scenario: Scenario, genesis: tuple[Block, State]) -> Block:
    return scenario.valid_training_block(*genesis)


def assert_rejected(scenario: Scenario, block: Block, reason: str) -> None:
    """The node rejects `block` with `reason`; neither its database nor the training blocks it keeps change."""
    before = (scenario.node.db.dump(), scenario.node.training_blocks())
    with pytest.raises(InvalidBlock, match=reason):
        scenario.node.on_training_block(block)
    assert (scenario.node.db.dump(), scenario.node.training_blocks()) == before


def test_wrong_slice(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    parent, _ = genesis
    assigned = compute_assigned_slice(parent.header, 4)
    block = scenario.build_training_block(*genesis, slice_id=(assigned + 1) % 4)
    assert_rejected(scenario, block, f"slice_id: got {(assigned + 1) % 4}, want {assigned}")


def test_every_miner_on_a_parent_is_assigned_its_slice(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    """The slice follows the parent's height alone (docs/spec.md, section 8): one update is a valid
    training block under any miner's key, and each height moves the slice on by one."""
    parent, state = genesis
    assert [compute_next_slice(height, 4) for height in range(6)] == [0, 1, 2, 3, 0, 1]
    assigned = compute_assigned_slice(parent.header, 4)
    values = scenario.trained_values(parent, state)
    for name in ("miner-1", "miner-6", "miner-7"):
        block = propose_training_block(scenario.chain, parent, state, devnet_key(name), values,
                                       parent.header.timestamp + 10, 8)  # fmt: skip
        assert isinstance(block.body, TrainingBody) and block.body.slice_id == assigned
        assert apply_training_block(state, parent, block, scenario.chain) is state


def test_claimed_loss_off_by_one(scenario: Scenario, genesis: tuple[Block, State], training: Block) -> None:
    assert isinstance(training.body, TrainingBody)
    after = training.body.loss_after
    block = scenario.build_training_block(*genesis, loss_after=after + 1)
    assert_rejected(scenario, block, f"loss_after: got {after + 1}, want {after}")
    before = training.body.loss_before
    block = scenario.build_training_block(*genesis, loss_before=before - 1)
    assert_rejected(scenario, block, f"loss_before: got {before - 1}, want {before}")


def test_gain_below_difficulty(scenario: Scenario, genesis: tuple[Block, State], training: Block) -> None:
    parent, state = genesis
    assert isinstance(training.body, TrainingBody)
    gain = training.body.loss_before - training.body.loss_after
    hard = dataclasses.replace(state, difficulty=gain + 1)
    block = scenario.build_training_block(parent, hard, state_root=hard.root)
    with pytest.raises(InvalidBlock, match=f"gain: got {gain}, need >= {gain + 1}"):
        apply_training_block(hard, parent, block, scenario.chain)


def test_out_of_range_weights(scenario: Scenario, genesis: tuple[Block, State], training: Block) -> None:
    assert isinstance(training.body, TrainingBody)
    values = np.frombuffer(training.body.weights, dtype="<i2").copy()
    values[17] = -32768
    block = scenario.build_training_block(*genesis, weights=values.tobytes())
    assert_rejected(scenario, block, "weights: value -32768 below -32767")
    block = scenario.build_training_block(*genesis, weights=training.body.weights[:-2])
    assert_rejected(scenario, block, "weights: got")


def test_bad_signature(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    block = scenario.build_training_block(*genesis, signature=bytes(64))
    assert_rejected(scenario, block, "signature: not the proposer's signature")
    # Signed by someone else than the header's proposer.
    block = scenario.build_training_block(*genesis, key=scenario.validators[0])
    assert_rejected(scenario, block, "signature: not the proposer's signature")


def test_wrong_chain_id(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    block = scenario.build_training_block(*genesis, chain_id="potchain-other")
    assert_rejected(scenario, block, "chain_id: got 'potchain-other', want 'potchain-devnet-1'")


def test_future_timestamp(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    now = scenario.node.decided.time
    block = scenario.build_training_block(*genesis, timestamp=now + 3600)
    assert_rejected(scenario, block, f"timestamp: {now + 3600} is in the future")


def test_unknown_parent(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    block = scenario.build_training_block(*genesis, parent=bytes(range(32)))
    assert_rejected(scenario, block, "parent: unknown block 000102")


def test_wrong_state_root_and_body_hash(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    block = scenario.build_training_block(*genesis, state_root=bytes(32))
    assert_rejected(scenario, block, "state_root: got 0000")
    block = scenario.build_training_block(*genesis, body_hash=bytes(32))
    assert_rejected(scenario, block, "body_hash: got 0000")


def test_a_training_block_builds_on_a_decided_block(
    scenario: Scenario, genesis: tuple[Block, State], training: Block
) -> None:
    _, state = genesis
    block = scenario.build_training_block(*genesis, parent=training.hash, height=training.header.height + 1)
    with pytest.raises(InvalidBlock, match="parent: a training block builds on a decided block, not TRAINING"):
        apply_training_block(state, training, block, scenario.chain)


def test_a_valid_training_block_is_kept_in_memory_only(scenario: Scenario, training: Block) -> None:
    """It changes no state and writes nothing: only a decided block naming it does (tests/test_decisions.py)."""
    before = scenario.node.db.dump()
    assert scenario.node.on_training_block(training) and not scenario.node.on_training_block(training)
    assert training in scenario.node.training_blocks() and scenario.node.db.dump() == before


def test_the_validation_batch_is_the_miners_own(
    scenario: Scenario, genesis: tuple[Block, State], training: Block
) -> None:
    """The validation seed is sha256(b"potchain/validation" || parent || miner) (docs/spec.md,
    section 17.2): two miners on one parent are checked on different batches, and losses
    claimed on another miner's batch are refused."""
    parent, state = genesis
    assert isinstance(training.body, TrainingBody)
    other = devnet_key("miner-1")
    ours, theirs = (compute_validation_seed(parent.hash, key.public_key) for key in (scenario.miner, other))
    assert ours != theirs and compute_validation_seed(training.hash, scenario.miner.public_key) != ours
    assert scenario.chain.loss(state, "validation", ours) == training.body.loss_before
    updated = state.with_slice(training.body.slice_id, training.body.weights)
    before, after = (scenario.chain.loss(s, "validation", theirs) for s in (state, updated))
    assert before != training.body.loss_before
    block = scenario.build_training_block(*genesis, loss_before=before, loss_after=after)
    assert_rejected(scenario, block, f"loss_before: got {before}, want {training.body.loss_before}")
