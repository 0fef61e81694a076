"""Building valid blocks and attestations: what miners and validators propose.

Each builder computes the numbers the rules will check (losses with the
canonical evaluator, rewards, the state root) and signs the result.
"""

from __future__ import annotations

import numpy as np

from chain.blocks import (
    Attestation,
    Block,
    Evidence,
    Header,
    Kind,
    TrainingBody,
    ValidationBody,
    body_hash,
    sign_attestation,
    sign_block,
    test_seed_for,
)
from chain.crypto import PrivateKey
from chain.state import State
from consensus.rules import (
    Chain,
    compute_assigned_slice,
    compute_rewards,
    compute_training_seed,
    compute_validation_outcome,
    compute_validation_seed,
    is_confirmed,
)


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
    slice_id = compute_assigned_slice(parent.header, key.public_key, chain.genesis.partition.slices)
    content = values.astype("<i2").tobytes()
    seed = compute_validation_seed(parent.hash)
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
    slice_id = compute_assigned_slice(parent.header, key.public_key, chain.genesis.partition.slices)
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


def attest(chain: Chain, key: PrivateKey, state: State, training: Block) -> Attestation:
    """`key`'s attestation of a training block whose parent state is `state`."""
    body = training.body
    assert isinstance(body, TrainingBody)
    seed = test_seed_for(key, chain.domain, training.hash)
    before = chain.loss(state, "test", seed)
    after = chain.loss(state.with_slice(body.slice_id, body.weights), "test", seed)
    return sign_attestation(key, chain.domain, training.hash, training.header.parent, before, after)


def propose_validation_block(
    chain: Chain,
    training: Block,
    state: State,
    key: PrivateKey,
    attestations: list[Attestation],
    evidence: list[Evidence],
    timestamp: int,
) -> Block:
    """A validation block by validator `key` for `training` (parent state `state`)."""
    body = ValidationBody(tuple(attestations), tuple(evidence))
    miner = training.header.proposer if is_confirmed(body) else None
    body = ValidationBody(
        tuple(attestations),
        tuple(evidence),
        compute_rewards(state, chain.genesis, miner, [a.validator for a in attestations]),
    )
    new_state = compute_validation_outcome(state, training, body, timestamp, chain)
    header = Header(
        chain_id=chain.genesis.chain_id,
        height=training.header.height + 1,
        parent=training.hash,
        kind=Kind.VALIDATION,
        timestamp=timestamp,
        proposer=key.public_key,
        state_root=new_state.root,
        body_hash=body_hash(body),
    )
    return sign_block(key, chain.domain, header, body)


def get_validation_proposers(state: State, training: Block) -> list[bytes]:
    """The validators, in the order they may propose the validation block of
    `training`: staked keys sorted, rotated by the number of training blocks
    decided before it. The first proposes as soon as it has a quorum; each
    next one only after the ones before it had their turn (a node waits
    `position * backoff` seconds), so a missing proposer delays the round
    without stopping it."""
    stakers = sorted(address for address, account in state.accounts.items() if account.stake > 0)
    if not stakers:
        return []
    offset = (training.header.height // 2) % len(stakers)
    return stakers[offset:] + stakers[:offset]


def get_quorum_stake(state: State, chain: Chain) -> int:
    """The least attesting stake a validation block needs (ceiling of the quorum fraction)."""
    parameters = chain.genesis.consensus
    total = state.total_stake
    return -(-total * parameters.quorum_numerator // parameters.quorum_denominator)
