"""Fork choice: first seen wins among equals, confirmed gain decides, reorgs
report both sides, equivocation is detected and slashed."""

from __future__ import annotations

from pathlib import Path

import pytest

from chain.crypto import devnet_key
from consensus.proposals import propose_validation_block
from consensus.rules import InvalidBlock
from tests.chain_builders import Scenario


def test_head_reorg_and_slashing(tmp_path: Path) -> None:
    scenario = Scenario.create(tmp_path)
    node = scenario.node
    genesis, state = node.checkpoint()
    first = scenario.valid_training_block(genesis, state)
    second = scenario.valid_training_block(genesis, state, timestamp=genesis.header.timestamp + 11,
                                           miner=devnet_key("miner-1"))  # fmt: skip
    assert first.hash != second.hash

    change = node.import_block(first.encode())
    assert change.new_head == first.hash and change.new_canonical == ((1, first.hash),)
    # Equal confirmed gain: the block seen first stays the head.
    change = node.import_block(second.encode())
    assert node.store.get_head() == first.hash and change.new_canonical == ()
    assert node.db.canonical_hash(1) == first.hash

    # Validator 0 attests both training blocks on the same parent: evidence.
    equivocator = scenario.validators[0]
    for attestation in scenario.attestations(first, state)[:1]:
        assert node.store.on_attestation(attestation) is None
    attestations = scenario.attestations(second, state)
    evidence = node.store.on_attestation(attestations[0])
    assert evidence is not None and evidence.first.validator == equivocator.public_key
    assert equivocator.public_key in node.store.attestations[second.hash]  # it still counts toward a quorum
    for attestation in attestations[1:]:
        assert node.store.on_attestation(attestation) is None

    # The validation block of the second training block confirms a gain: reorg.
    validation = propose_validation_block(
        scenario.chain, second, state, scenario.validators[1], attestations[1:], [evidence],
        second.header.timestamp + 5,
    )  # fmt: skip
    change = node.import_block(validation.encode())
    assert change.new_canonical == ((1, second.hash), (2, validation.hash))
    assert change.old_canonical == ((1, first.hash),)
    assert node.db.canonical_hash(1) == second.hash and node.db.head() == validation.hash
    final_state = node.checkpoint()[1]
    assert final_state.stake_of(equivocator.public_key) == 0
    assert final_state.total_stake == 3_000_000

    # The abandoned training block can no longer be built on.
    with pytest.raises(InvalidBlock, match="conflicts with the finalized block"):
        node.store.on_block(first)
    node.close()


def test_get_head_tie_breaks_on_gain_then_first_seen_then_lowest_hash(tmp_path: Path) -> None:
    from chain.blocks import ZERO_HASH, Block, GenesisBody, Header, Kind
    from consensus.fork_choice import Node

    scenario = Scenario.create(tmp_path)
    store = scenario.node.store
    anchor = store.nodes[store.finalized]

    def leaf(timestamp: int, gain: int, seen: int) -> Node:
        header = Header("potchain-devnet-1", 1, anchor.block.hash, Kind.TRAINING, timestamp, ZERO_HASH, ZERO_HASH,
                        ZERO_HASH)  # fmt: skip
        return Node(Block(header, GenesisBody()), anchor.state, gain, seen)

    a, b, c = leaf(1, 5, 3), leaf(2, 5, 3), leaf(3, 4, 1)
    for node in (a, b, c):
        store.nodes[node.block.hash] = node
    assert store.get_head() == min(a.block.hash, b.block.hash)  # equal gain and arrival: lowest hash
    b.seen = 2
    assert store.get_head() == b.block.hash  # equal gain: first seen
    c.confirmed_gain = 6
    assert store.get_head() == c.block.hash  # most confirmed gain
    scenario.node.close()
