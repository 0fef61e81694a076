"""Builders of valid blocks, and of blocks that break exactly one rule.

`Scenario` holds a node on a fresh data directory and one trained slice
update for the genesis parent; `build_training_block(parent, **overrides)`
returns a signed training block with any header or body field replaced
(re-hashed and re-signed unless the override is the hash or signature).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chain.blocks import Attestation, Block, Header, Kind, TrainingBody, ValidationBody, body_hash, sign_block
from chain.crypto import PrivateKey, devnet_key
from chain.state import State
from consensus.proposals import attest, propose_training_block, propose_validation_block
from consensus.rules import compute_assigned_slice, compute_rewards, is_confirmed
from genesis import DEVNET, chunk_directory
from node import validator_keys
from p2p.full_node import FullNode
from training.data import load_split
from training.miner import Miner, TrainingConfig

HEADER_FIELDS = {f.name for f in dataclasses.fields(Header)}
TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingBody)}


@dataclass
class Scenario:
    node: FullNode
    miner: PrivateKey
    validators: list[PrivateKey]
    train_text: bytes

    @classmethod
    def create(cls, datadir: Path) -> Scenario:
        node = FullNode(DEVNET, datadir)
        text = load_split(node.genesis.dataset, chunk_directory(DEVNET, node.genesis), "train")
        return cls(node, devnet_key("miner-0"), validator_keys(node.genesis), text)

    @property
    def chain(self) -> Any:
        return self.node.chain

    def trained_values(
        self, parent: Block, state: State, steps: int = 8, miner: PrivateKey | None = None
    ) -> np.ndarray:
        key = miner or self.miner
        slice_id = compute_assigned_slice(parent.header, key.public_key, self.node.genesis.partition.slices)
        config = TrainingConfig(steps=steps, batch_sequences=16, warmup_steps=1)
        weights = self.chain.weights(state)
        return Miner(weights, self.chain.layout, self.train_text, config).work(weights, slice_id, parent.hash).values

    def valid_training_block(
        self, parent: Block, state: State, timestamp: int | None = None, miner: PrivateKey | None = None
    ) -> Block:
        key = miner or self.miner
        values = self.trained_values(parent, state, miner=key)
        when = timestamp if timestamp is not None else parent.header.timestamp + 10
        return propose_training_block(self.chain, parent, state, key, values, when, 8)

    def build_training_block(self, on: Block, state: State, key: PrivateKey | None = None, **overrides: Any) -> Block:
        """A valid training block on block `on` (state `state`), then with `overrides` applied."""
        valid = self.valid_training_block(on, state)
        return rebuild(valid, key or self.miner, self.chain.domain, **overrides)

    def attestations(self, training: Block, state: State) -> list[Attestation]:
        return [attest(self.chain, key, state, training) for key in self.validators]

    def valid_validation_block(
        self, training: Block, state: State, attestations: list[Attestation], proposer: PrivateKey | None = None
    ) -> Block:
        return propose_validation_block(
            self.chain, training, state, proposer or self.validators[0], attestations, [],
            training.header.timestamp + 10,
        )  # fmt: skip

    def build_validation_block(
        self, training: Block, state: State, attestations: list[Attestation], **overrides: Any
    ) -> Block:
        """A validation block for `training` carrying exactly these attestations (rewards to match)."""
        attesters = [a.validator for a in attestations]
        miner = training.header.proposer if is_confirmed(ValidationBody(tuple(attestations))) else None
        body = ValidationBody(tuple(attestations), (), compute_rewards(state, self.node.genesis, miner, attesters))
        header = Header(
            chain_id=self.node.genesis.chain_id,
            height=training.header.height + 1,
            parent=training.hash,
            kind=Kind.VALIDATION,
            timestamp=training.header.timestamp + 10,
            proposer=self.validators[0].public_key,
            state_root=state.root,
            body_hash=body_hash(body),
        )
        return rebuild(sign_block(self.validators[0], self.chain.domain, header, body), self.validators[0],
                       self.chain.domain, **overrides)  # fmt: skip


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
