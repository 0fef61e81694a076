"""Building valid training blocks: what miners propose.

Each builder computes the numbers the rules will check (the validation
losses with the canonical evaluator) and signs the result. Decided blocks
are built by `consensus.decisions.propose_decided_block`.
"""

from __future__ import annotations

import numpy as np

from chain.blocks import Block, Header, Kind, TrainingBody, body_hash, sign_block
from chain.crypto import PrivateKey
from chain.state import State
from consensus.rules import Chain, compute_assigned_slice, compute_training_seed, compute_validation_seed


def propose_training_block(
    chain: Chain,
    parent: Block,
    state: State,
    key: PrivateKey,
    values: np.ndarray,
    timestamp: int,
    steps: int,
    state_root: bytes | None = None,
) -> Block:
    """A training block by `key` setting its assigned slice to `values`.

    `state_root` is the parent state's root when `state` holds only the
    parent's model (an external miner that fetched the weights over the RPC)."""
    slice_id = compute_assigned_slice(parent.header, chain.genesis.partition.slices)
    content = values.astype("<i2").tobytes()
    seed = compute_validation_seed(parent.hash, key.public_key)
    before = chain.loss(state, "validation", seed)
    after = chain.loss(state.with_slice(slice_id, content), "validation", seed)
    body = TrainingBody(
        slice_id=slice_id,
        weights=content,
        loss_before=before,
        loss_after=after,
        steps=steps,
        data_seed=compute_training_seed(parent.hash, key.public_key),
    )
    header = Header(
        chain_id=chain.genesis.chain_id,
        height=parent.header.height + 1,
        parent=parent.hash,
        kind=Kind.TRAINING,
        timestamp=timestamp,
        proposer=key.public_key,
        state_root=state.root if state_root is None else state_root,
        body_hash=body_hash(body),
    )
    return sign_block(key, chain.domain, header, body)


def propose_best_training_block(
    chain: Chain,
    parent: Block,
    state: State,
    key: PrivateKey,
    values: np.ndarray,
    timestamp: int,
    steps: int,
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25),
    state_root: bytes | None = None,
) -> Block:
    """A training block moving the assigned slice a fraction of the way from the
    chain's values to `values`: the first fraction whose validation gain meets
    the difficulty, else the one with the largest gain (the caller checks it).

    A miner's local model runs ahead of the chain on every slice; the slice it
    publishes joins slices the chain holds from earlier blocks, and a full move
    sometimes fits them worse than a partial one. Trying three fractions costs
    three evaluations, little next to the training it rescues.
    """
    slice_id = compute_assigned_slice(parent.header, chain.genesis.partition.slices)
    current = chain.layout.extract(chain.weights(state), slice_id).astype(np.int64)
    best: Block | None = None
    best_gain = 0
    for fraction in fractions:
        moved = np.floor(current + fraction * (values.astype(np.int64) - current) + 0.5).astype(np.int16)
        block = propose_training_block(chain, parent, state, key, moved, timestamp, steps, state_root)
        assert isinstance(block.body, TrainingBody)
        gain = block.body.loss_before - block.body.loss_after
        if best is None or gain > best_gain:
            best, best_gain = block, gain
        if gain >= state.difficulty:
            return block
    assert best is not None
    return best
