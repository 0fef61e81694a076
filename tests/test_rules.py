"""One test per validity rule: each block breaks exactly that rule, is rejected
with its reason, and leaves the database byte-for-byte as it was."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from chain.blocks import Block, TrainingBody, sign_attestation
from chain.state import State
from consensus.rules import InvalidBlock, apply_block, compute_assigned_slice
from tests.chain_builders import Scenario
from training.data import seed_from_int


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    scenario = Scenario.create(tmp_path_factory.mktemp("rules"))
    yield scenario
    scenario.node.close()


@pytest.fixture(scope="module")
def genesis(scenario: Scenario) -> tuple[Block, State]:
    return scenario.node.checkpoint()


@pytest.fixture(scope="module")
def training(scenario: Scenario, genesis: tuple[Block, State]) -> Block:
    return scenario.valid_training_block(*genesis)


def assert_rejected(scenario: Scenario, block: Block, reason: str) -> None:
    """The node rejects `block` with `reason` and its database does not change."""
    before = scenario.node.db.dump()
    with pytest.raises(InvalidBlock, match=reason):
        scenario.node.import_block(block.encode())
    assert scenario.node.db.dump() == before


def test_wrong_slice(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    parent, _ = genesis
    assigned = compute_assigned_slice(parent.header, scenario.miner.public_key, 4)
    block = scenario.build_training_block(*genesis, slice_id=(assigned + 1) % 4)
    assert_rejected(scenario, block, f"slice_id: got {(assigned + 1) % 4}, want {assigned}")


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
        apply_block(hard, parent, block, scenario.chain)


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
    now = scenario.node.store.time
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


def test_validation_rules(scenario: Scenario, genesis: tuple[Block, State], training: Block) -> None:
    """Validation blocks: quorum, seeds, numbers, duplicates, pairing; then the valid one, and finality."""
    parent, state = genesis
    scenario.node.import_block(training.encode())
    attestations = scenario.attestations(training, state)

    too_few = scenario.build_validation_block(training, state, attestations[:2])
    assert_rejected(scenario, too_few, "attestations: stake 2000000 of 4000000, need >= 2/3")

    # A validator who evaluated a batch of its own choosing instead of its signature's seed.
    key = scenario.validators[1]
    chosen = seed_from_int(0)
    assert isinstance(training.body, TrainingBody)
    updated = state.with_slice(training.body.slice_id, training.body.weights)
    own_numbers = (scenario.chain.loss(state, "test", chosen), scenario.chain.loss(updated, "test", chosen))
    wrong_seed = sign_attestation(key, scenario.chain.domain, training.hash, parent.hash, *own_numbers)
    block = scenario.build_validation_block(training, state, [attestations[0], wrong_seed, attestations[2]])
    assert_rejected(scenario, block, "attestation .*: loss_before")

    # A seed signature that is not the validator's.
    forged = dataclasses.replace(attestations[1], seed_signature=bytes(64))
    block = scenario.build_validation_block(training, state, [attestations[0], forged, attestations[2]])
    assert_rejected(scenario, block, "attestation .*: bad signature")

    # Claimed test loss off by one (re-signed, so only the number is wrong).
    a = attestations[2]
    off = sign_attestation(scenario.validators[2], scenario.chain.domain, a.training_block, a.parent,
                           a.loss_before, a.loss_after + 1)  # fmt: skip
    block = scenario.build_validation_block(training, state, [attestations[0], attestations[1], off])
    assert_rejected(scenario, block, f"attestation .*: loss_after {a.loss_after + 1}, want {a.loss_after}")

    duplicate = scenario.build_validation_block(training, state, [attestations[0], attestations[0], attestations[1]])
    assert_rejected(scenario, duplicate, "attestations: duplicate attester")

    # A validation block whose parent is not a training block.
    wrong_parent = scenario.build_validation_block(training, state, attestations[:3], parent=parent.hash, height=1)
    assert_rejected(scenario, wrong_parent, "parent: a validation block pairs with a training block, not GENESIS")

    valid = scenario.valid_validation_block(training, state, attestations)
    change = scenario.node.import_block(valid.encode())
    assert change.new_head == valid.hash
    final_block, final_state = scenario.node.checkpoint()
    assert final_block.hash == valid.hash
    assert final_state.finalized_hash == training.hash
    assert final_state.slices[training.body.slice_id] == training.body.weights
    miner_balance = final_state.accounts[scenario.miner.public_key].balance
    assert miner_balance == 700_000

    # A training block on genesis now conflicts with finality.
    competitor = scenario.build_training_block(parent, state, timestamp=parent.header.timestamp + 11)
    assert_rejected(scenario, competitor, "height: 1 conflicts with the finalized block at height 1")

    # A second validator's validation block for the same training block (another
    # quorum) competes as a sibling: every node picks the same head at once.
    sibling = scenario.valid_validation_block(training, state, attestations[:3], proposer=scenario.validators[1])
    change = scenario.node.import_block(sibling.encode())
    both = {valid.hash, sibling.hash}
    assert scenario.node.store.get_head() == min(both)
    assert scenario.node.checkpoint()[0].hash == min(both)
    assert scenario.node.db.canonical_hash(2) == min(both)


def test_difficulty_retarget_and_rewards(scenario: Scenario, genesis: tuple[Block, State]) -> None:
    from consensus.rules import compute_difficulty, compute_rewards

    g = scenario.node.genesis
    target = g.consensus.target_interval_seconds
    assert compute_difficulty(80, target // 2 - 1, g) == 90  # fast: up by 80 // 8
    assert compute_difficulty(80, target, g) == 80
    assert compute_difficulty(80, 2 * target + 1, g) == 70  # slow: down
    assert compute_difficulty(1, 10**6, g) == 1  # never below 1
    assert compute_difficulty(1, 0, g) == 2  # at least one step

    _, state = genesis
    attesters = [key.public_key for key in scenario.validators[:3]]
    rewards = compute_rewards(state, g, scenario.miner.public_key, attesters)
    assert rewards[0].address == scenario.miner.public_key and rewards[0].amount == 700_000
    assert [r.address for r in rewards[1:]] == sorted(attesters)
    assert all(r.amount == 100_000 for r in rewards[1:])
    assert sum(r.amount for r in rewards) <= g.consensus.block_reward
    # A rejected update pays the validators for their work, and not the miner.
    rejected = compute_rewards(state, g, None, attesters)
    assert [r.address for r in rejected] == sorted(attesters) and all(r.amount == 100_000 for r in rejected)
