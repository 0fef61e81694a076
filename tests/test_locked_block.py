"""A validator never loses the block it locked on: before a key signs a proposal or vote for a
block, the node keeps the block and the training blocks it names on disk, pending
(chain/store.py `keep_pending`, p2p/decided_node.py `keep_signed`, p2p/voting.py `_sign`).

Without that, a node killed (or stopped by a full disk) between its keys' precommits and the
decision's write restarts locked on a block nobody holds any more: it prevotes nil for every
other block and can only re-propose or accept the lost one, so a single-node network (or one
where more than a third of stake restarted so) stops for good (`Stalled` here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from chain import schema
from chain.blocks import Block, DecidedBody
from chain.store import StorageError
from consensus.decisions import propose_decided_block
from consensus.proposals import propose_training_block
from genesis import DEVNET
from node import validator_keys
from p2p.decided_node import DecidedNode
from p2p.localnet import LocalVoting, Stalled
from p2p.signer import SignerRecord
from p2p.voting import BuildBlock
from p2p.voting_node import VotingNode, VotingNodeConfig
from tests.chain_builders import Scenario, decide_next, devnet_test_shard


class Killed(Exception):
    """The node's process died as it was to write the decision."""


@pytest.fixture(scope="module")
def training_block(tmp_path_factory: pytest.TempPathFactory) -> Block:
    """A valid training block on the devnet's genesis (3 optimizer steps: the devnet's difficulty needs no more)."""
    scenario = Scenario.create(tmp_path_factory.mktemp("builder"))
    try:
        parent, state = scenario.genesis()
        values = scenario.trained_values(parent, state, steps=3)
        return propose_training_block(
            scenario.chain, parent, state, scenario.miner, values, parent.header.timestamp + 10, 3
        )
    finally:
        scenario.node.close()


def checked_candidate(node: DecidedNode, proposer: int, training: Block) -> Block:
    """A candidate for the next height by validator `proposer` naming `training`, checked by `node`."""
    head = node.head()
    key = validator_keys(node.genesis)[proposer]
    block = propose_decided_block(
        node.chain, head.block, head.state, key, [training], head.commit, node.decided.head_validators, (),
        devnet_test_shard(key.public_key),
    )  # fmt: skip
    node.check_candidate(block, {training.hash: training})
    return block


def test_pending_blocks_are_found_after_reopening_pruned_by_the_decision_and_never_canonical(
    tmp_path: Path, training_block: Block
) -> None:
    node = DecidedNode(DEVNET, tmp_path)
    try:
        assert node.on_training_block(training_block)
        candidate = checked_candidate(node, 0, training_block)
        assert node.db.pending_keys() == []
        node.keep_signed(candidate.hash)
        assert sorted(node.db.pending_keys()) == sorted([(1, candidate.hash), (1, training_block.hash)])
        with pytest.raises(ValueError, match="pending height: got 0, want at least 1"):
            node.db.keep_pending(0, (candidate,))

        # Signing again for a block already pending, or for one held nowhere (a message re-sent
        # after a restart), writes nothing: a store refusing writes would raise otherwise.
        other = checked_candidate(node, 1, training_block)
        node.db.failure = "keeping 2 pending block(s) at height 1: IO error: No space left on device"
        node.keep_signed(candidate.hash)
        node.keep_signed(bytes(32))
        node.db.keep_pending(1, (training_block, candidate))  # each block is written once
        with pytest.raises(StorageError, match="refused, an earlier write failed"):
            node.keep_signed(other.hash)
    finally:
        node.close()

    reopened = DecidedNode(DEVNET, tmp_path)
    try:
        # After a restart the candidate and its training block are found (to check, and to serve
        # peers), but neither is decided, canonical, nor has a state.
        assert reopened.head().block.header.height == 0 and not reopened.decided.candidate_blocks
        assert reopened.block_by_hash(candidate.hash) == candidate
        assert reopened.block_by_hash(training_block.hash) == training_block
        assert reopened.block_by_hash(other.hash) is None
        assert not reopened.is_canonical(candidate) and not reopened.is_canonical(training_block)
        assert reopened.block_at(1) is None and reopened.state_of(candidate.hash) is None

        # Another candidate naming the same training block adds itself only; a block pending at a
        # later height outlives this height's decision.
        assert reopened.on_training_block(training_block)
        reopened.check_candidate(other, {training_block.hash: training_block})
        reopened.keep_signed(other.hash)
        reopened.db.keep_pending(2, (training_block,))
        expected = [(1, candidate.hash), (1, other.hash), (1, training_block.hash), (2, training_block.hash)]
        assert sorted(reopened.db.pending_keys()) == sorted(expected)

        keys = validator_keys(reopened.genesis)
        decided = decide_next(reopened, keys[2], keys, None)
        assert reopened.db.pending_keys() == [(2, training_block.hash)]
        assert reopened.block_by_hash(candidate.hash) is None and reopened.block_by_hash(other.hash) is None
        assert reopened.is_canonical(decided) and not reopened.is_canonical(training_block)
    finally:
        reopened.close()


@pytest.mark.parametrize("pending_copy", ["kept", "lost"])
def test_a_node_killed_before_storing_its_decision_restarts_locked_and_decides_the_same_block(
    tmp_path: Path, training_block: Block, monkeypatch: pytest.MonkeyPatch, pending_copy: str
) -> None:
    """All four devnet validator keys in one node (localnet's voting): a quorum of keys precommits
    the height's block, the node dies as it writes the decision, and restarts from its store and
    its signer record, its keys locked on a block its memory lost. It fetches nothing (it has no
    peers): it decides the block it locked on from the pending copy. Without that copy (as
    before pending blocks were kept), the height never decides."""
    node = DecidedNode(DEVNET, tmp_path)
    keys = validator_keys(node.genesis)
    try:
        assert node.on_training_block(training_block)
        local = LocalVoting.open(node, keys)
        local.start()

        def killed(decision: object) -> None:
            raise Killed("killed before the decision was written")

        monkeypatch.setattr(node, "store", killed)
        with pytest.raises(Killed):
            local.decide_height()
        decided = node.decided.head.block  # decided in memory, never stored
        assert decided.header.height == 1 and node.db.head() == node.genesis_block.hash
    finally:
        node.close()
    record = SignerRecord.open(tmp_path / "signer")
    locks = [state.locked_value if (state := record.load(key.public_key)) is not None else None for key in keys]
    assert locks.count(decided.hash) >= 3, locks  # a quorum (3 of 4) precommitted it: the height decided
    kinds = {type(m).__name__ for key in keys if (state := record.load(key.public_key)) for m in state.sent}
    signed_for = {m.block_hash for key in keys if (state := record.load(key.public_key)) for m in state.sent}
    assert kinds == {"Proposal", "Vote"} and signed_for == {decided.hash}

    restarted = DecidedNode(DEVNET, tmp_path)
    try:
        assert restarted.head().block.header.height == 0 and not restarted.decided.candidate_blocks
        assert sorted(restarted.db.pending_keys()) == sorted([(1, decided.hash), (1, training_block.hash)])
        if pending_copy == "lost":
            for height, block_hash in restarted.db.pending_keys():
                restarted.db.db.delete(schema.pending_key(height, block_hash), sync=True)
        local = LocalVoting.open(restarted, keys)
        local.start()
        if pending_copy == "lost":
            with pytest.raises(Stalled, match="height 1: not decided after 64 timeouts"):
                local.decide_height()
            return
        decision = local.decide_height()
        assert decision.block == decided and decision.training_blocks == (training_block,)
        assert restarted.db.head() == decided.hash and restarted.db.pending_keys() == []
        assert isinstance(decided.body, DecidedBody) and decided.body.training[0].training_block == training_block.hash
        assert local.decide_height().block.header.height == 2  # and the chain goes on
    finally:
        restarted.close()


def test_a_failed_write_of_the_block_to_sign_for_prevents_the_signature_and_stops_the_node(
    tmp_path: Path, training_block: Block
) -> None:
    node = DecidedNode(DEVNET, tmp_path)
    try:
        assert node.on_training_block(training_block)
        voting_node = VotingNode(node, VotingNodeConfig(validator_keys=validator_keys(node.genesis)))
        voting = voting_node.voting
        effects = voting.start(node.genesis.timestamp)
        build = next(effect for effect in effects if isinstance(effect, BuildBlock))
        block = voting.build_block(build.validator)
        node.db.failure = "writing height 1: IO error: No space left on device"  # as a full disk leaves it
        with pytest.raises(StorageError, match="refused, an earlier write failed"):
            trio.run(voting_node._voting_call, voting.on_value, build.validator, build.round, block)
        assert voting.signed == [] and SignerRecord.open(tmp_path / "signer").load(build.validator) is None
        assert voting_node.failure is not None
        assert voting_node.failure.startswith("keeping a block to sign for failed: ")
        assert node.db.pending_keys() == []
    finally:
        node.close()
