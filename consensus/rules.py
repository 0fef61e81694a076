"""The rules every block shares, the training block's, and what they need.

`Chain` holds genesis, the validation and test splits and a memoizing
canonical evaluator; `genesis_state`/`genesis_block` build height 0; the
work assignment and seeds follow from the parent hash; `validate_header` is
every block's header rules and `apply_training_block(state, parent, block,
chain)` a training block's (docs/spec.md, section 8). Pure and synchronous:
each re-computes every claimed number with the canonical evaluator and
raises `InvalidBlock` with the reason, cheap checks first.

A training block proposes a slice update with its validation-loss
improvement on a decided block (or genesis); it changes no state. The
decided block of the next height names it, tests it out of sample, and
applies it or not (consensus/decisions.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from chain.blocks import ZERO_HASH, Block, GenesisBody, Header, Kind, TrainingBody, body_hash
from chain.crypto import Domain
from chain.heldout import empty_bitmap
from chain.state import Account, HeldOut, State
from consensus.genesis import Genesis
from training.data import batch_of_sequences, sample_batch
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
        text = self.validation_text if split == "validation" else self.test_text
        evaluation = self.genesis.evaluation
        sequences = evaluation.validation_sequences if split == "validation" else evaluation.test_sequences
        inputs, targets = sample_batch(text, seed, sequences, self.genesis.model.context)
        return self._evaluate(state, key, inputs, targets)

    def loss_on(self, state: State, sequences: Sequence[bytes]) -> int:
        """Canonical loss total of the state's model on these sequences of context + 1 bytes
        (a held-out test's revealed sequences)."""
        key = (state.weights_root, "sequences", hashlib.sha256(b"".join(sequences)).digest())
        if key in self._losses:
            self._losses.move_to_end(key)
            return self._losses[key]
        inputs, targets = batch_of_sequences(sequences)
        return self._evaluate(state, key, inputs, targets)

    def _evaluate(
        self, state: State, key: tuple[bytes, str, bytes], inputs: torch.Tensor, targets: torch.Tensor
    ) -> int:
        if self._tables is None:
            self._tables = self.genesis.tables()
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
    heldout = {
        a.public_key: HeldOut(a.heldout.root, a.heldout.sequences, empty_bitmap(a.heldout.sequences))
        for a in genesis.accounts
        if a.heldout is not None
    }
    return State(
        slices=slices,
        accounts=accounts,
        difficulty=genesis.consensus.initial_difficulty,
        finalized_height=0,
        finalized_hash=bytes.fromhex(genesis.hash),
        finalized_timestamp=genesis.timestamp,
        heldout=heldout,
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


def compute_assigned_slice(parent: Header, slices: int) -> int:
    """parent.height mod slices: the slice every training block on `parent` sets.

    The parent (genesis or a decided block) counts the decided heights, so the chain
    cycles through every slice in turn, one per height, and every miner at a height
    trains and publishes the same slice: the updates a decided block names compete and
    average on one slice (docs/spec.md, section 18), and a copy of an update revealed
    at one height cannot be revealed for its slice at the next. Round-robin keeps every
    slice of the chain's model at most `slices - 1` heights behind a miner's local model.
    """
    return compute_next_slice(parent.height, slices)


def compute_next_slice(parent_height: int, slices: int) -> int:
    """The slice assigned on a parent at `parent_height` (known before that parent exists:
    what a miner trains and commits to for it)."""
    return parent_height % slices


def compute_validation_seed(parent_hash: bytes, proposer: bytes) -> bytes:
    """sha256(b"potchain/validation" || parent || proposer): the validation batch of a
    training block by `proposer` on this parent. A miner that committed its update in
    the parent (section 17) fixed the update before the parent, and so this batch, existed."""
    return hashlib.sha256(b"potchain/validation" + parent_hash + proposer).digest()


def compute_training_seed(parent_hash: bytes, proposer: bytes) -> bytes:
    """The seed a miner's training batches should come from (informative)."""
    return hashlib.sha256(b"potchain/train" + parent_hash + proposer).digest()


# --- Block rules ---------------------------------------------------------------


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


def decode_slice(content: bytes, expected_values: int) -> np.ndarray:
    """A training body's weights as int16 values, checked for size and range."""
    if len(content) != 2 * expected_values:
        raise InvalidBlock(f"weights: got {len(content)} bytes, want {2 * expected_values}")
    values = np.frombuffer(content, dtype="<i2")
    if values.size and int(values.min()) < -WEIGHT_MAX:
        raise InvalidBlock(f"weights: value {int(values.min())} below -{WEIGHT_MAX}")
    return values


def apply_training_block(state: State, parent: Block, block: Block, chain: Chain) -> State:
    """A training block's rules on `parent` (state `state`); returns that state unchanged."""
    header, body = block.header, block.body
    if not isinstance(body, TrainingBody):
        raise InvalidBlock("body: a training block needs a training body")
    if parent.header.kind not in (Kind.GENESIS, Kind.DECIDED):
        raise InvalidBlock(f"parent: a training block builds on a decided block, not {parent.header.kind.name}")
    validate_header(parent.header, block, chain)
    if header.state_root != state.root:
        raise InvalidBlock(f"state_root: got {header.state_root.hex()}, want {state.root.hex()}")

    slices = chain.genesis.partition.slices
    assigned = compute_assigned_slice(parent.header, slices)
    if body.slice_id != assigned:
        raise InvalidBlock(f"slice_id: got {body.slice_id}, want {assigned}")
    decode_slice(body.weights, chain.layout.slice_size(body.slice_id))

    seed = compute_validation_seed(parent.hash, header.proposer)
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
