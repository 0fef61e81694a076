"""Builders of valid blocks, and of blocks that break exactly one rule.

`Scenario` holds a decided node on a fresh data directory, the devnet's
miner and validator keys and the training text; `genesis()` is the genesis
block and state; `build_training_block(parent, state, **overrides)` returns
a signed training block with any header or body field replaced (re-hashed
and re-signed unless the override is the hash or signature).
`decide_next(node, proposer, keys, training)` decides a node's next height
with a certificate signed by `keys`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plyvel

from chain import schema
from chain.blocks import (
    Block,
    Header,
    TrainingBody,
    UpdateCommitment,
    body_hash,
    compute_update_hash,
    sha256,
    sign_block,
    sign_update_commitment,
)
from chain.crypto import PrivateKey, devnet_key
from chain.encoding import pack
from chain.heldout import Shard
from chain.state import State
from chain.store import ChainDB
from chain.votes import Commit, Vote, VoteKind, sign_vote
from consensus.decisions import propose_decided_block
from consensus.proposals import propose_training_block
from consensus.rules import Chain, compute_assigned_slice, genesis_block, genesis_state
from genesis import DEVNET, chunk_directory, devnet_shard, load_genesis
from node import validator_keys
from p2p.decided_node import DecidedNode
from training.data import load_split
from training.miner import Miner, TrainingConfig

HEADER_FIELDS = {f.name for f in dataclasses.fields(Header)}
TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingBody)}


@dataclass
class Scenario:
    node: DecidedNode
    miner: PrivateKey
    validators: list[PrivateKey]
    train_text: bytes

    @classmethod
    def create(cls, datadir: Path) -> Scenario:
        node = DecidedNode(DEVNET, datadir)
        text = load_split(node.genesis.dataset, chunk_directory(DEVNET, node.genesis), "train")
        return cls(node, devnet_key("miner-0"), validator_keys(node.genesis), text)

    @property
    def chain(self) -> Chain:
        return self.node.chain

    def genesis(self) -> tuple[Block, State]:
        """The genesis block and state (whatever the node decided since)."""
        block = self.node.genesis_block
        return block, self.node.db.state(block.hash)

    def trained_values(self, parent: Block, state: State, steps: int = 8) -> np.ndarray:
        slice_id = compute_assigned_slice(parent.header, self.node.genesis.partition.slices)
        config = TrainingConfig(steps=steps, batch_sequences=16, warmup_steps=1)
        weights = self.chain.weights(state)
        return Miner(weights, self.chain.layout, self.train_text, config).work(weights, slice_id, parent.hash).values

    def local_miner(self, state: State, steps: int = 4) -> Miner:
        """A miner's local model, starting from `state`'s, that trains `steps` steps per `work`: one
        model gives updates for every slice (`Miner.values`), fixed before the decided block they
        are revealed on exists (what a miner commits to)."""
        config = TrainingConfig(steps=steps, batch_sequences=16, warmup_steps=1)
        return Miner(self.chain.weights(state), self.chain.layout, self.train_text, config)

    def valid_training_block(
        self, parent: Block, state: State, timestamp: int | None = None, miner: PrivateKey | None = None
    ) -> Block:
        key = miner or self.miner
        values = self.trained_values(parent, state)
        when = timestamp if timestamp is not None else parent.header.timestamp + 10
        return propose_training_block(self.chain, parent, state, key, values, when, 8)

    def build_training_block(self, on: Block, state: State, key: PrivateKey | None = None, **overrides: Any) -> Block:
        """A valid training block on block `on` (state `state`), then with `overrides` applied."""
        valid = self.valid_training_block(on, state)
        return rebuild(valid, key or self.miner, self.chain.domain, **overrides)


def commit_to(scenario: Scenario, key: PrivateKey, height: int, slice_id: int, values: np.ndarray) -> UpdateCommitment:
    """`key`'s commitment, carried at `height`, to setting slice `slice_id` to `values`."""
    update = compute_update_hash(key.public_key, slice_id, values.astype("<i2").tobytes())
    return sign_update_commitment(key, scenario.chain.domain, height, update)


def rebuild(block: Block, key: PrivateKey, domain: Any, **overrides: Any) -> Block:
    """`block` with fields replaced; body_hash and signature recomputed unless overridden."""
    body = block.body
    body_changes = {k: v for k, v in overrides.items() if k in TRAINING_FIELDS and isinstance(body, TrainingBody)}
    if body_changes:
        body = dataclasses.replace(body, **body_changes)
    header_changes = {k: v for k, v in overrides.items() if k in HEADER_FIELDS}
    header_changes.setdefault("body_hash", body_hash(body))
    header = dataclasses.replace(block.header, **header_changes)
    signed = sign_block(key, domain, header, body)
    if "signature" in overrides:
        return Block(header, body, overrides["signature"])
    return signed


# --- Decided chains (voting rounds) -------------------------------------------------


def certificate(node: DecidedNode, block: Block, keys: list[PrivateKey]) -> Commit:
    """A round-0 commit certificate for `block` from `keys`' precommits (stamped 2 s after the block)."""
    height, domain = block.header.height, node.chain.domain
    return Commit.of([
        sign_vote(k, domain, Vote(VoteKind.PRECOMMIT, height, 0, block.hash, block.header.timestamp + 2, k.public_key))
        for k in keys
    ])  # fmt: skip


@functools.cache
def devnet_test_shard(validator: bytes) -> Shard | None:
    """The devnet validator's INSECURE held-out shard (genesis.devnet_shard), built once per test run."""
    return devnet_shard(load_genesis(DEVNET), DEVNET, validator)


def decide_next(
    node: DecidedNode,
    proposer: PrivateKey,
    keys: list[PrivateKey],
    training: Block | None,
    shard: Shard | None = None,
) -> Block:
    """Propose the next height's block by `proposer` testing `training` (or none) on its
    held-out shard (by default its devnet shard), and import it with a certificate from `keys`."""
    shard = shard or devnet_test_shard(proposer.public_key)
    head = node.head()
    block = propose_decided_block(
        node.chain, head.block, head.state, proposer, [] if training is None else [training], head.commit,
        node.decided.head_validators, (), shard,
    )  # fmt: skip
    named = {training.hash: training} if training is not None else {}
    node.import_decided(block, certificate(node, block, keys), named)
    return block


def write_retired_store(datadir: Path) -> bytes:
    """A store in `datadir`/chain whose head (height 1, canonical, finalized) is a block of
    the retired kind 2, an earlier version's validation block; returns its hash. The block's
    body is that version's empty one and its signature zeros: it never decodes past its kind."""
    genesis = load_genesis(DEVNET)
    state = genesis_state(genesis)
    first = genesis_block(genesis, state)
    ChainDB(datadir / "chain", bytes.fromhex(genesis.hash), first, state).close()
    body: list[list[Any]] = [[], [], []]  # attestations, evidence, rewards
    header = [genesis.chain_id, 1, first.hash, 2, first.header.timestamp + 1,
              validator_keys(genesis)[0].public_key, state.root, sha256(pack(body))]  # fmt: skip
    block_hash = sha256(pack(header))
    db = plyvel.DB(str(datadir / "chain"))
    with db.write_batch(transaction=True, sync=True) as batch:
        batch.put(schema.block_key(block_hash), pack([header, body, bytes(64)]))
        batch.put(schema.state_key(block_hash), state.record())
        batch.put(schema.canonical_key(1), block_hash)
        batch.put(schema.META_HEAD, block_hash)
        batch.put(schema.META_FINALIZED, block_hash)
    db.close()
    return block_hash
