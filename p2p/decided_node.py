"""A node's decided chain and its LevelDB store, kept in step.

Every decided block enters through `import_decided` (a block with its commit
certificate, from the node's own voting or from sync): validated by the
decided chain (consensus/decided_chain.py), then written in one atomic batch
with its certificate and the training blocks it names. A decided block is
final, so a restart needs no re-validation: the head, its state, its
certificate and the validator set that voted on it are read back, and the
node resumes deciding the next height. Training blocks on the head and
checked candidates live in memory only (a restarted node keeps new ones as they arrive),
except the candidates a validator key of the node signs for (`keep_signed`): those, with
the training blocks they name, are written before the signature exists, so that a
validator locked on a block still holds it after a restart (docs/spec.md, section 15).

A write that fails (a full disk) raises `chain.store.StorageError` and leaves
memory as the disk is: `import_decided` validates on a copy of the decided
chain and advances the node only once the store holds the decision, and
`store` (the voting's decision, which already advanced the decided chain)
puts the decided head back to the stored one. The store then refuses every
later write, so the node must stop; a restart reads back the last stored height.

The networked node, the RPC and the miner share one `DecidedNode`; every
method but `head` takes its lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from chain.blocks import Block, DecidedBody, Kind, TrainingBody, UpdateCommitment
from chain.encoding import DecodeError
from chain.state import Account, State
from chain.store import ChainDB, CorruptStore, StorageError
from chain.votes import Commit
from consensus.decided_chain import DecidedChain, Decision
from consensus.decisions import get_validator_set
from consensus.rules import (
    Chain,
    compute_assigned_slice,
    compute_next_slice,
    compute_training_seed,
    compute_validation_seed,
    genesis_block,
    genesis_state,
)
from consensus.voting import ValidatorSet
from genesis import chunk_directory, load_genesis
from p2p.events import BLOCK, FINALIZED, HEAD, EventPublisher, block_data, finalized_data, head_data
from p2p.metrics import MeteredChain, NodeMetrics
from training.data import load_split, seed_from_int
from training.evaluate import default_backend
from training.tables import LOSS_BITS
from training.weights import CanonicalWeights

MAX_RECENT_TRAINING_BYTES = 128 << 20
"""Bytes of lately kept training blocks served after they leave the head."""


def _weights_bytes(block: Block) -> int:
    return len(block.body.weights) if isinstance(block.body, TrainingBody) else 0


@dataclass(frozen=True)
class WorkAssignment:
    """What a miner needs to produce a training block on the decided head."""

    parent_hash: bytes
    """The decided head (or genesis) the block must build on."""
    height: int
    """The training block's height."""
    state_root: bytes
    """The parent state's root (the training block's header carries it)."""
    slice_id: int
    """The slice the miner's key is assigned."""
    difficulty: int
    """The validation gain the block must reach."""
    validation_seed: bytes
    """Seed of the validation batch the proof is computed on."""
    training_seed: bytes
    """Seed the miner's training batches come from (informative)."""
    min_timestamp: int
    """The block's timestamp must be at least this (the parent's + 1)."""
    commitment_height: int
    """The height of the next decided block: a commitment for it names an update the miner
    reveals on that block (docs/spec.md, section 17)."""
    commitment_slice_id: int
    """The slice that update is for: the one the miner's key is assigned on that block."""


def mean_loss(chain: Chain, state: State, split: str) -> float:
    """Nats per token on the split's report batch (seed 0): informative only."""
    sequences = chain.genesis.evaluation.validation_sequences
    if split == "test":
        sequences = chain.genesis.evaluation.test_sequences
    tokens = sequences * chain.genesis.model.context
    return round(chain.loss(state, split, seed_from_int(0)) / tokens / (1 << LOSS_BITS), 5)


class DecidedNode:
    """One node's decided chain, shared by its network loop, RPC and miner."""

    def __init__(self, genesis_path: Path, datadir: Path, backend: str | None = None) -> None:
        self.genesis_path = genesis_path
        self.genesis = load_genesis(genesis_path)
        self.datadir = datadir
        directory = chunk_directory(genesis_path, self.genesis)
        self.chunk_directory = directory
        """Where the dataset's chunks are (served to peers by the sync protocol)."""
        self.metrics = NodeMetrics()
        """The node's Prometheus metrics (p2p/metrics.py), served at the RPC's /metrics."""
        self.chain = MeteredChain(
            self.genesis,
            validation_text=load_split(self.genesis.dataset, directory, "validation"),
            test_text=load_split(self.genesis.dataset, directory, "test"),
            backend=backend or default_backend("cpu"),
        )
        self.chain.on_evaluation = self.metrics.evaluation_seconds.observe
        self.lock = threading.RLock()
        """Held by every method; callers composing several calls hold it too."""
        self.events = EventPublisher()
        """Decided heads and blocks kept, for the RPC's event stream (the network node adds votes)."""
        self.received_at: dict[bytes, float] = {}
        """Wall-clock time (Unix seconds) each block was first kept or stored here (since the start)."""
        self._losses: dict[bytes, tuple[float, float]] = {}
        self._recent_training: OrderedDict[bytes, Block] = OrderedDict()
        """Training blocks kept lately, served for a while after a decision clears them from the
        head (an announcer must serve what it announced, even to a peer a height behind)."""
        self._recent_training_bytes = 0
        first_state = genesis_state(self.genesis)
        self.genesis_block = genesis_block(self.genesis, first_state)
        self.db = ChainDB(datadir / "chain", bytes.fromhex(self.genesis.hash), self.genesis_block, first_state)
        try:
            self.decided = self._load_head(first_state)
        except (KeyError, DecodeError) as error:
            self.db.close()
            raise CorruptStore(f"{datadir}: the decided head does not read back: {error}") from None
        except CorruptStore:
            self.db.close()
            raise
        self._stored: tuple[Decision, ValidatorSet | None] = (self.decided.head, self.decided.head_validators)
        """The decided head the store holds, and the validators who voted on it."""
        self.decided.on_tick(int(time.time()))
        self.metrics.on_head(self.decided.head, self.genesis)

    def _load_head(self, first_state: State) -> DecidedChain:
        head = self.db.block(self.db.head())
        if head.header.kind == Kind.GENESIS:
            return DecidedChain.from_genesis(self.chain, self.genesis_block, first_state)
        if head.header.kind != Kind.DECIDED or not isinstance(head.body, DecidedBody):
            raise CorruptStore(
                f"{self.datadir}: the head is a {head.header.kind.name.lower()} block, not a decided one"
            )
        commit = self.db.commit(head.hash)
        if commit is None:
            raise CorruptStore(f"{self.datadir}: the decided head {head.hash.hex()} has no commit certificate")
        named = tuple(self.db.block(verdict.training_block) for verdict in head.body.training)
        previous = self.db.state(head.header.parent)
        decision = Decision(head, self.db.state(head.hash), commit, named)
        return DecidedChain(self.chain, decision, get_validator_set(previous, self.genesis))

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # --- writes ---------------------------------------------------------------

    def on_training_block(self, block: Block) -> bool:
        """Keep a valid training block on the head (raises InvalidBlock); False if already kept."""
        with self.lock:
            self.decided.on_tick(int(time.time()))
            kept = self.decided.on_training_block(block)
            if kept:
                self.received_at.setdefault(block.hash, time.time())
                self._remember_training(block)
                self.events.publish(BLOCK, block_data(block))
            return kept

    def _remember_training(self, block: Block) -> None:
        size = _weights_bytes(block)
        self._recent_training[block.hash] = block
        self._recent_training_bytes += size
        while self._recent_training_bytes > MAX_RECENT_TRAINING_BYTES and len(self._recent_training) > 1:
            _, oldest = self._recent_training.popitem(last=False)
            self._recent_training_bytes -= _weights_bytes(oldest)

    def on_commitment(self, commitment: UpdateCommitment) -> bool:
        """Keep a miner's update commitment for the next decided block (`DecidedChain.on_commitment`)."""
        with self.lock:
            return self.decided.on_commitment(commitment)

    def check_candidate(self, block: Block, training_blocks: Mapping[bytes, Block]) -> State:
        """Check a block proposed for the next height (raises InvalidBlock)."""
        with self.lock:
            self.decided.on_tick(int(time.time()))
            return self.decided.on_candidate(block, training_blocks)

    def import_decided(
        self, block: Block, commit: Commit, training_blocks: Mapping[bytes, Block] | None = None
    ) -> Decision:
        """The next height is decided: validate the block and its certificate, store them.
        The node changes only once the store holds them: a failed write (StorageError)
        leaves the decided chain, its kept training blocks and candidates as they were."""
        with self.lock:
            decided = self.decided
            scratch = replace(
                decided,
                training=dict(decided.training),
                candidates=dict(decided.candidates),
                candidate_blocks=dict(decided.candidate_blocks),
            )
            decision = scratch.on_decided(block, commit, training_blocks)
            self._write(decision, scratch.head_validators)
            # Stored: advance the node's own decided chain, with the state just computed.
            decided.candidates[block.hash] = decision.state
            named = {training.hash: training for training in decision.training_blocks}
            advanced = decided.on_decided(block, commit, named)
            self._stored = (advanced, decided.head_validators)
            self._announce(advanced)
            self.metrics.on_decided(advanced, self.genesis, "sync")
            return advanced

    def store(self, decision: Decision) -> None:
        """Write a decision the decided chain already took (the voting's `Decided`). If the
        write fails (StorageError), the decided head goes back to the one stored."""
        with self.lock:
            stored, stored_validators = self._stored
            if self.decided.head is decision:
                validators = self.decided.head_validators
            else:
                validators = get_validator_set(stored.state, self.genesis)
            try:
                self._write(decision, validators)
            except StorageError:
                if self.decided.head is decision:
                    self.decided.head, self.decided.head_validators = stored, stored_validators
                raise
            self._announce(decision)
            self.metrics.on_decided(decision, self.genesis, "voting")

    def keep_signed(self, block_hash: bytes) -> None:
        """A validator key of this node is about to sign a proposal or vote for a block of the
        height being decided: keep the block, and the training blocks it names, pending on
        disk (one synced batch; nothing if already kept), so that after a restart a key locked
        on it still holds it. A block held nowhere (a message signed before a restart,
        re-sent, or a valid value re-proposed that the quorum which prevoted it holds) has
        nothing to keep. Raises StorageError if the write fails: the key must not sign."""
        with self.lock:
            height = self.decided.height
            candidate = self.decided.candidate_blocks.get(block_hash)
            if candidate is None or self.db.has_pending(height, block_hash):
                return
            block, training = candidate
            named: tuple[Block, ...] = ()
            if isinstance(block.body, DecidedBody):
                named = tuple(training[verdict.training_block] for verdict in block.body.training)
            self.db.keep_pending(height, (*named, block))

    def _write(self, decision: Decision, validators: ValidatorSet | None) -> None:
        """Store a decision (raises StorageError, changing nothing, if the write fails)."""
        if decision.commit is None:
            raise ValueError(f"decision at height {decision.block.header.height}: no commit certificate")
        self.db.import_decision(decision.block, decision.state, decision.commit, decision.training_blocks)
        self._stored = (decision, validators)
        now = time.time()
        for block in (decision.block, *decision.training_blocks):
            self.received_at.setdefault(block.hash, now)

    def _announce(self, decision: Decision) -> None:
        """Publish a stored decision, once the node's head is it: its block, the new head, final."""
        assert decision.commit is not None
        self.events.publish(BLOCK, block_data(decision.block))
        self.events.publish(HEAD, head_data(decision.block, decision.commit.round))
        self.events.publish(FINALIZED, finalized_data(decision.block))

    # --- reads ------------------------------------------------------------------

    def head(self) -> Decision:
        """The last decided block, its state, certificate and training blocks. Without the lock:
        a `Decision` is immutable and replaced whole, so the network loop reads it without
        waiting on an evaluation another thread holds the lock for."""
        return self.decided.head

    def block_at(self, height: int) -> Block | None:
        """The decided block at a height (genesis at 0), if decided. Without the lock, like
        every read of decided data only: a decided block is final, LevelDB reads are safe
        beside writes, and a decision's batch lands whole (the sync server reads this way
        so that serving peers never holds up the voting)."""
        block_hash = self.db.canonical_hash(height) if height >= 0 else None
        return None if block_hash is None else self.db.block(block_hash)

    def stored_block(self, block_hash: bytes) -> Block | None:
        """A decided block, or a training block a decided block names (without the lock)."""
        return self.db.block(block_hash) if self.db.has_block(block_hash) else None

    def commit_of(self, block_hash: bytes) -> Commit | None:
        """A decided block's commit certificate (without the lock)."""
        return self.db.commit(block_hash)

    def block_by_hash(self, block_hash: bytes) -> Block | None:
        """A stored block (decided or named training block), a kept training block, a checked
        candidate, or a block kept pending at the height being decided (`keep_signed`)."""
        with self.lock:
            if block_hash in self.decided.training:
                return self.decided.training[block_hash]
            candidate = self.decided.candidate_blocks.get(block_hash)
            if candidate is not None:
                return candidate[0]
            if block_hash in self._recent_training:
                return self._recent_training[block_hash]
            if self.db.has_block(block_hash):
                return self.db.block(block_hash)
            return self.db.pending_block(self.decided.height, block_hash)

    def is_canonical(self, block: Block) -> bool:
        """Decided (or named by a decided block), as opposed to kept or proposed only."""
        with self.lock:
            return self.db.has_block(block.hash)

    def validators_of(self, block: Block) -> dict[bytes, int]:
        """The stakes of the validators who voted on a decided block's height (its parent's state's)."""
        with self.lock:
            return dict(get_validator_set(self.db.state(block.header.parent), self.genesis).stakes)

    def slice_content(self, slice_hash: bytes) -> bytes | None:
        """A slice's content by its SHA-256 (any stored state's; without the lock)."""
        return self.db.slice_content(slice_hash)

    def state_of(self, block_hash: bytes) -> State | None:
        """The state after a decided block."""
        with self.lock:
            block = self.block_by_hash(block_hash)
            if (
                block is None
                or block.header.kind not in (Kind.GENESIS, Kind.DECIDED)
                or not self.db.has_block(block_hash)
            ):
                return None
            return self.db.state(block_hash)

    def weights_of(self, state: State) -> CanonicalWeights:
        with self.lock:
            return self.chain.weights(state)

    def account(self, address: bytes) -> Account | None:
        with self.lock:
            return self.decided.head.state.accounts.get(address)

    def training_blocks(self) -> list[Block]:
        """The valid training blocks kept on the head (the next height's candidates' inputs)."""
        with self.lock:
            return list(self.decided.training.values())

    def mean_losses(self, state: State) -> tuple[float, float]:
        """(validation, test) nats per token of a state's model on each split's
        report batch (seed 0): informative, cached by weights root."""
        with self.lock:
            key = state.weights_root
            if key not in self._losses:
                self._losses[key] = (mean_loss(self.chain, state, "validation"), mean_loss(self.chain, state, "test"))
                if len(self._losses) > 64:
                    self._losses.pop(next(iter(self._losses)))
            return self._losses[key]

    def work_for(self, miner: bytes) -> WorkAssignment:
        """The assignment for a training block by `miner` on the decided head."""
        with self.lock:
            head = self.decided.head
            parent, state = head.block, head.state
            return WorkAssignment(
                parent_hash=parent.hash,
                height=parent.header.height + 1,
                state_root=state.root,
                slice_id=compute_assigned_slice(parent.header, self.genesis.partition.slices),
                difficulty=state.difficulty,
                validation_seed=compute_validation_seed(parent.hash, miner),
                training_seed=compute_training_seed(parent.hash, miner),
                min_timestamp=parent.header.timestamp + 1,
                commitment_height=parent.header.height + 1,
                commitment_slice_id=compute_next_slice(parent.header.height + 1, self.genesis.partition.slices),
            )
