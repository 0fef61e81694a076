"""The state transition: `apply_block(state, parent, block, chain) -> state`.

Pure and synchronous: it reads the parent state and the block, re-computes
every claimed number with the canonical evaluator, and returns the new state
or raises `InvalidBlock` with the reason. Cheap checks come first.

A chain alternates: genesis, training block, validation block, training
block, ... A training block proposes a slice update with its validation-loss
improvement; it does not change the state. Its validation block carries
attestations from at least 2/3 of stake that re-evaluated the update on test
batches seeded by their own signatures; their aggregate test gain is the
verdict. A positive verdict applies the update and pays the miner; either way
the block pays the validators, slashes equivocators, retargets difficulty and
makes the decision final.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from chain.blocks import (
    ZERO_HASH,
    Attestation,
    Block,
    GenesisBody,
    Header,
    Kind,
    Reward,
    TrainingBody,
    ValidationBody,
    body_hash,
)
from chain.crypto import Domain
from chain.state import Account, State
from consensus.genesis import Genesis
from training.data import sample_batch
from training.evaluate import CanonicalEvaluator, default_backend, make_backend
from training.tables import Tables
from training.weights import WEIGHT_MAX, CanonicalWeights, SliceLayout


class InvalidBlock(Exception):
    """A block that breaks a rule; the message names the rule and the numbers."""


class UnknownParent(InvalidBlock):
    """A block whose parent this node does not hold (yet): not proof of a fault."""


class StaleBlock(InvalidBlock):
    """A block that conflicts with finality: it may have been valid when it was
    made, and arrived too late (a losing racer's), so its sender is not at fault."""


@dataclass
class Chain:
    """What the rules need besides the state: genesis, data and an evaluator.

    Evaluations are memoized by (weights root, split, seed); that is a cache of
    a pure function, not state.
    """

    genesis: Genesis
    """The parsed genesis."""
    validation_text: bytes
    """The validation split's text."""
    test_text: bytes
    """The test split's text."""
    backend: str = field(default_factory=lambda: default_backend("cpu"))
    """Evaluator backend name."""
    device: str = "cpu"
    """Evaluator device."""
    _tables: Tables | None = field(default=None, init=False, repr=False)
    _weights: tuple[bytes, CanonicalWeights] | None = field(default=None, init=False, repr=False)
    _losses: OrderedDict[tuple[bytes, str, bytes], int] = field(default_factory=OrderedDict, init=False, repr=False)
    evaluations: int = field(default=0, init=False)
    """Canonical evaluations this chain ran (memoized answers not counted): what checking costs."""

    @property
    def domain(self) -> Domain:
        return Domain(self.genesis.chain_id, bytes.fromhex(self.genesis.hash))

    @property
    def layout(self) -> SliceLayout:
        return _layout(self.genesis)

    def weights(self, state: State) -> CanonicalWeights:
        """The model a state holds."""
        if self._weights is not None and self._weights[0] == state.weights_root:
            return self._weights[1]
        values = [np.frombuffer(content, dtype="<i2").astype(np.int16) for content in state.slices]
        weights = self.layout.assemble(self.genesis.exponents, values)
        self._weights = (state.weights_root, weights)
        return weights

    def forget_losses(self) -> None:
        """Drop the memoized losses (to time a cold validation, as a fresh node does it)."""
        self._losses.clear()

    def loss(self, state: State, split: str, seed: bytes) -> int:
        """Canonical loss total of the state's model on the split's batch for `seed`."""
        key = (state.weights_root, split, seed)
        if key in self._losses:
            self._losses.move_to_end(key)
            return self._losses[key]
        if self._tables is None:
            self._tables = self.genesis.tables()
        text = self.validation_text if split == "validation" else self.test_text
        evaluation = self.genesis.evaluation
        sequences = evaluation.validation_sequences if split == "validation" else evaluation.test_sequences
        inputs, targets = sample_batch(text, seed, sequences, self.genesis.model.context)
        evaluator = CanonicalEvaluator(self.weights(state), self._tables, make_backend(self.backend, self.device))
        total = evaluator.per_token_losses(inputs, targets).loss_total
        self.evaluations += 1
        self._losses[key] = total
        if len(self._losses) > 256:
            self._losses.popitem(last=False)
        return total


_LAYOUTS: dict[str, SliceLayout] = {}


def _layout(genesis: Genesis) -> SliceLayout:
    if genesis.hash not in _LAYOUTS:
        _LAYOUTS[genesis.hash] = SliceLayout(genesis.model, genesis.partition)
    return _LAYOUTS[genesis.hash]


# --- Genesis ---------------------------------------------------------------


def genesis_state(genesis: Genesis) -> State:
    layout = _layout(genesis)
    weights = genesis.initial_weights()
    slices = tuple(
        layout.extract(weights, slice_id).astype("<i2").tobytes() for slice_id in range(genesis.partition.slices)
    )
    accounts = {a.public_key: Account(a.balance, a.stake) for a in genesis.accounts}
    return State(
        slices=slices,
        accounts=accounts,
        difficulty=genesis.consensus.initial_difficulty,
        finalized_height=0,
        finalized_hash=bytes.fromhex(genesis.hash),
        finalized_timestamp=genesis.timestamp,
    )


def genesis_block(genesis: Genesis, state: State) -> Block:
    header = Header(
        chain_id=genesis.chain_id,
        height=0,
        parent=ZERO_HASH,
        kind=Kind.GENESIS,
        timestamp=genesis.timestamp,
        proposer=ZERO_HASH,
        state_root=state.root,
        body_hash=bytes.fromhex(genesis.hash),
    )
    return Block(header, GenesisBody())


# --- Work assignment (from the parent hash) --------------------------------


def compute_assigned_slice(parent: Header, proposer: bytes, slices: int) -> int:
    """(parent.height // 2 + int(sha256(b"potchain/slice" || proposer)[:8])) mod slices.

    parent.height // 2 counts the training blocks decided so far (on a
    decided block of the voting rounds, its height counts the decided
    heights, and replaces it), so each miner
    cycles through every slice in turn, from an offset its key fixes (miners
    racing at one height mostly get different slices). Round-robin keeps every
    slice of the chain's model at most `slices - 1` blocks behind a miner's
    local model; random assignment let slices go stale and cost accuracy
    (docs/benchmarks.md).
    """
    offset = int.from_bytes(hashlib.sha256(b"potchain/slice" + proposer).digest()[:8], "big")
    decided = parent.height if parent.kind == Kind.DECIDED else parent.height // 2
    return (decided + offset) % slices


def compute_validation_seed(parent_hash: bytes) -> bytes:
    """sha256(b"potchain/validation" || parent): the validation batch of every
    training block on this parent."""
    return hashlib.sha256(b"potchain/validation" + parent_hash).digest()


def compute_training_seed(parent_hash: bytes, proposer: bytes) -> bytes:
    """The seed a miner's training batches should come from (informative)."""
    return hashlib.sha256(b"potchain/train" + parent_hash + proposer).digest()


# --- Rewards and difficulty ---------------------------------------------------


def is_confirmed(body: ValidationBody) -> bool:
    """Whether a validation body's verdict is positive: aggregate test gain > 0."""
    return sum(a.gain for a in body.attestations) > 0


def compute_rewards(state: State, genesis: Genesis, miner: bytes | None, attesters: list[bytes]) -> tuple[Reward, ...]:
    """The miner of a confirmed update (`miner`; None when rejected) gets
    miner_share_percent of the block reward; attesting validators split the
    rest in proportion to stake (rounded down; the remainder, and the miner's
    share of a rejected update, is not minted). Miner first, then attesters by
    address; no zero amounts."""
    parameters = genesis.consensus
    miner_reward = parameters.block_reward * parameters.miner_share_percent // 100
    pool = parameters.block_reward - miner_reward
    attesting_stake = sum(state.stake_of(a) for a in attesters)
    rewards = [Reward(miner, miner_reward)] if miner is not None and miner_reward else []
    for address in sorted(attesters):
        amount = pool * state.stake_of(address) // attesting_stake if attesting_stake else 0
        if amount:
            rewards.append(Reward(address, amount))
    return tuple(rewards)


def compute_difficulty(difficulty: int, interval: int, genesis: Genesis) -> int:
    """Faster than half the target interval: up by difficulty // divisor (at
    least 1); slower than twice the target: down by as much (never below 1)."""
    parameters = genesis.consensus
    step = max(1, difficulty // parameters.retarget_divisor)
    if interval < parameters.target_interval_seconds // 2:
        return difficulty + step
    if interval > 2 * parameters.target_interval_seconds:
        return max(1, difficulty - step)
    return difficulty


# --- The state transition ----------------------------------------------------


def validate_header(parent: Header, block: Block, chain: Chain, same_time_allowed: bool = False) -> None:
    """The rules every block's header follows; `same_time_allowed` lets a decided block
    share its parent's time (its time is the parent's commit time, section 16)."""
    header = block.header
    if header.chain_id != chain.genesis.chain_id:
        raise InvalidBlock(f"chain_id: got {header.chain_id!r}, want {chain.genesis.chain_id!r}")
    if header.parent != parent.hash:
        raise InvalidBlock(f"parent: got {header.parent.hex()}, want {parent.hash.hex()}")
    if header.height != parent.height + 1:
        raise InvalidBlock(f"height: got {header.height}, want {parent.height + 1}")
    if header.timestamp < parent.timestamp or (header.timestamp == parent.timestamp and not same_time_allowed):
        raise InvalidBlock(f"timestamp: got {header.timestamp}, must exceed the parent's {parent.timestamp}")
    if header.body_hash != body_hash(block.body):
        raise InvalidBlock(f"body_hash: got {header.body_hash.hex()}, want {body_hash(block.body).hex()}")
    if not block.is_signed_by_proposer(chain.domain):
        raise InvalidBlock("signature: not the proposer's signature of this block")


def apply_block(state: State, parent: Block, block: Block, chain: Chain) -> State:
    """The state after `block`, whose parent is `parent` with state `state`."""
    kind = block.header.kind
    if kind == Kind.TRAINING:
        return apply_training_block(state, parent, block, chain)
    if kind == Kind.VALIDATION:
        return apply_validation_block(state, parent, block, chain)
    raise InvalidBlock(f"kind: {kind.name} blocks exist only at height 0")


def decode_slice(content: bytes, expected_values: int) -> np.ndarray:
    """A training body's weights as int16 values, checked for size and range."""
    if len(content) != 2 * expected_values:
        raise InvalidBlock(f"weights: got {len(content)} bytes, want {2 * expected_values}")
    values = np.frombuffer(content, dtype="<i2")
    if values.size and int(values.min()) < -WEIGHT_MAX:
        raise InvalidBlock(f"weights: value {int(values.min())} below -{WEIGHT_MAX}")
    return values


def apply_training_block(state: State, parent: Block, block: Block, chain: Chain) -> State:
    header, body = block.header, block.body
    if not isinstance(body, TrainingBody):
        raise InvalidBlock("body: a training block needs a training body")
    if parent.header.kind not in (Kind.GENESIS, Kind.VALIDATION, Kind.DECIDED):
        raise InvalidBlock(f"parent: a training block builds on a validation block, not {parent.header.kind.name}")
    validate_header(parent.header, block, chain)
    if header.state_root != state.root:
        raise InvalidBlock(f"state_root: got {header.state_root.hex()}, want {state.root.hex()}")

    slices = chain.genesis.partition.slices
    assigned = compute_assigned_slice(parent.header, header.proposer, slices)
    if body.slice_id != assigned:
        raise InvalidBlock(f"slice_id: got {body.slice_id}, want {assigned}")
    decode_slice(body.weights, chain.layout.slice_size(body.slice_id))

    seed = compute_validation_seed(parent.hash)
    before = chain.loss(state, "validation", seed)
    if body.loss_before != before:
        raise InvalidBlock(f"loss_before: got {body.loss_before}, want {before}")
    after = chain.loss(state.with_slice(body.slice_id, body.weights), "validation", seed)
    if body.loss_after != after:
        raise InvalidBlock(f"loss_after: got {body.loss_after}, want {after}")
    gain = before - after
    if gain < state.difficulty:
        raise InvalidBlock(f"gain: got {gain}, need >= {state.difficulty}")
    return state


def validate_attestation(state: State, attestation: Attestation, training: Block, updated: State, chain: Chain) -> None:
    """One attestation of `training`: a current validator, both signatures, and
    its test losses equal to the canonical evaluator's on its own seed."""
    who = attestation.validator.hex()[:16]
    if state.stake_of(attestation.validator) <= 0:
        raise InvalidBlock(f"attestation {who}: not a validator")
    if attestation.training_block != training.hash:
        got = attestation.training_block.hex()
        raise InvalidBlock(f"attestation {who}: training_block {got}, want {training.hash.hex()}")
    if attestation.parent != training.header.parent:
        raise InvalidBlock(f"attestation {who}: parent {attestation.parent.hex()}, want {training.header.parent.hex()}")
    if not attestation.is_signed_by_validator(chain.domain):
        raise InvalidBlock(f"attestation {who}: bad signature")
    seed = attestation.test_seed
    before = chain.loss(state, "test", seed)
    if attestation.loss_before != before:
        raise InvalidBlock(f"attestation {who}: loss_before {attestation.loss_before}, want {before}")
    after = chain.loss(updated, "test", seed)
    if attestation.loss_after != after:
        raise InvalidBlock(f"attestation {who}: loss_after {attestation.loss_after}, want {after}")


def apply_validation_block(state: State, parent: Block, block: Block, chain: Chain) -> State:
    header, body = block.header, block.body
    if not isinstance(body, ValidationBody):
        raise InvalidBlock("body: a validation block needs a validation body")
    if parent.header.kind != Kind.TRAINING:
        raise InvalidBlock(f"parent: a validation block pairs with a training block, not {parent.header.kind.name}")
    validate_header(parent.header, block, chain)
    if state.stake_of(header.proposer) <= 0:
        raise InvalidBlock("proposer: not a validator")
    new_state = compute_validation_outcome(state, parent, body, header.timestamp, chain)
    if header.state_root != new_state.root:
        raise InvalidBlock(f"state_root: got {header.state_root.hex()}, want {new_state.root.hex()}")
    return new_state


def compute_validation_outcome(
    state: State, training: Block, body: ValidationBody, timestamp: int, chain: Chain
) -> State:
    """The state after a validation body decides on `training` (whose state is `state`).

    Checks the attestations (distinct validators, correct numbers, a quorum of
    stake), the evidence and the rewards. The verdict is the aggregate test
    gain: if positive, the slice update is applied and the miner paid;
    otherwise the model stays as it was. Either way the payouts and slashings
    apply, difficulty retargets, and the training block is final (decided).
    """
    if not isinstance(training.body, TrainingBody):
        raise InvalidBlock("parent: not a training block")
    confirmed = is_confirmed(body)
    with_update = state.with_slice(training.body.slice_id, training.body.weights)
    updated = with_update if confirmed else state
    attesters: list[bytes] = []
    for attestation in body.attestations:
        if attestation.validator in attesters:
            raise InvalidBlock(f"attestations: duplicate attester {attestation.validator.hex()[:16]}")
        attesters.append(attestation.validator)
    for attestation in body.attestations:
        validate_attestation(state, attestation, training, with_update, chain)
    parameters = chain.genesis.consensus
    attesting = sum(state.stake_of(a) for a in attesters)
    total = state.total_stake
    if attesting * parameters.quorum_denominator < total * parameters.quorum_numerator:
        raise InvalidBlock(
            f"attestations: stake {attesting} of {total}, "
            f"need >= {parameters.quorum_numerator}/{parameters.quorum_denominator}"
        )

    accounts = dict(updated.accounts)
    slashed: set[bytes] = set()
    for evidence in body.evidence:
        offender = validate_evidence(state, evidence.first, evidence.second, chain)
        if offender in slashed:
            raise InvalidBlock(f"evidence: {offender.hex()[:16]} slashed twice")
        slashed.add(offender)
        accounts[offender] = replace(accounts[offender], stake=0)

    rewards = compute_rewards(state, chain.genesis, training.header.proposer if confirmed else None, attesters)
    if body.rewards != rewards:
        raise InvalidBlock(f"rewards: got {_describe(body.rewards)}, want {_describe(rewards)}")
    for reward in rewards:
        account = accounts.get(reward.address, Account(0, 0))
        accounts[reward.address] = replace(account, balance=account.balance + reward.amount)

    return replace(
        updated,
        accounts=accounts,
        difficulty=compute_difficulty(state.difficulty, timestamp - state.finalized_timestamp, chain.genesis),
        finalized_height=training.header.height,
        finalized_hash=training.hash,
        finalized_timestamp=timestamp,
    )


def validate_evidence(state: State, first: Attestation, second: Attestation, chain: Chain) -> bytes:
    """Two attestations by one staked validator for different training blocks
    on the same parent; returns the offender."""
    offender = first.validator
    if second.validator != offender:
        raise InvalidBlock("evidence: attestations by different validators")
    if first.parent != second.parent or first.training_block == second.training_block:
        raise InvalidBlock("evidence: not two different training blocks on one parent")
    if not (first.is_signed_by_validator(chain.domain) and second.is_signed_by_validator(chain.domain)):
        raise InvalidBlock("evidence: bad signature")
    if state.stake_of(offender) <= 0:
        raise InvalidBlock(f"evidence: {offender.hex()[:16]} has no stake to slash")
    return offender


def _describe(rewards: tuple[Reward, ...]) -> str:
    return "[" + ", ".join(f"{r.address.hex()[:16]}:{r.amount}" for r in rewards) + "]"
