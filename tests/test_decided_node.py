"""The decided node (p2p/decided_node.py): decisions are stored with their
certificates, a restart resumes at the decided head with the right validator
set, invalid input writes nothing, and a data directory of the retired
validation blocks is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from chain.store import CorruptStore
from consensus.decisions import propose_decided_block
from consensus.rules import InvalidBlock
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from tests.chain_builders import Scenario, certificate, decide_next, write_retired_store


def test_decisions_survive_a_restart_and_the_chain_goes_on(tmp_path: Path) -> None:
    scenario = Scenario.create(tmp_path / "builder")
    keys = scenario.validators
    node = DecidedNode(DEVNET, tmp_path / "node")
    genesis, state = node.head().block, node.head().state
    training = scenario.valid_training_block(genesis, state)
    assert node.on_training_block(training)
    first = decide_next(node, keys[0], keys[:3], training)
    second = decide_next(node, keys[1], keys[1:], None)
    before = node.db.dump()
    with pytest.raises(InvalidBlock, match="stake"):
        head = node.head()
        bad = propose_decided_block(node.chain, head.block, head.state, keys[2], [], head.commit,
                                    node.decided.head_validators, ())  # fmt: skip
        node.import_decided(bad, certificate(node, bad, keys[:1]))
    assert node.db.dump() == before
    validators = node.decided.head_validators
    node.close()

    again = DecidedNode(DEVNET, tmp_path / "node")
    try:
        head = again.head()
        assert head.block == second and head.commit == again.commit_of(second.hash) is not None
        assert again.decided.head_validators == validators
        assert again.block_at(1) == first and again.block_by_hash(training.hash) == training
        third = decide_next(again, keys[3], keys, None)
        assert again.block_at(3) == third and again.head().block.header.timestamp >= second.header.timestamp
    finally:
        again.close()
        scenario.node.close()


def test_a_data_directory_of_the_retired_finality_is_refused(tmp_path: Path) -> None:
    """A store whose head is a validation block (kind 2, retired with the attestation finality)."""
    head = write_retired_store(tmp_path / "old")
    with pytest.raises(CorruptStore, match=f"head block {head.hex()}: header: kind 2 is retired") as raised:
        DecidedNode(DEVNET, tmp_path / "old")
    assert "validation block" in str(raised.value)
