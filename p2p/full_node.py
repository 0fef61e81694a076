"""The node's chain: the fork-choice store and the LevelDB store, kept in step.

Every block, from a local miner, a peer or the RPC, enters through
`import_block`: decode, validate against the fork-choice store, then one
atomic write to the database. The network loop, the RPC thread and the
miner share one `FullNode`; every method takes its lock, so callers never
see a store and a database that disagree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from chain.blocks import Attestation, Block, Evidence, decode_block
from chain.encoding import DecodeError
from chain.state import Account, State
from chain.store import ChainDB, CorruptStore
from consensus.fork_choice import HeadChange, Store
from consensus.genesis import Genesis
from consensus.rules import (
    Chain,
    InvalidBlock,
    compute_assigned_slice,
    compute_training_seed,
    compute_validation_seed,
    genesis_block,
    genesis_state,
    validate_evidence,
)
from genesis import chunk_directory, load_genesis
from training.data import load_split, seed_from_int
from training.evaluate import default_backend
from training.tables import LOSS_BITS
from training.weights import CanonicalWeights


@dataclass(frozen=True)
class WorkAssignment:
    """What a miner needs to produce a training block on the current checkpoint."""

    parent_hash: bytes
    """The checkpoint (genesis or last validation block) the block must build on."""
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


@dataclass(frozen=True)
class ImportResult:
    """What importing a block did."""

    block: Block
    """The decoded block."""
    known: bool
    """It was already in the store (nothing changed)."""
    change: HeadChange
    """How the head moved."""


class FullNode:
    """One node's chain state, shared by the network loop, the RPC and the miner."""

    def __init__(self, genesis_path: Path, datadir: Path, backend: str | None = None) -> None:
        self.genesis_path = genesis_path
        self.genesis: Genesis = load_genesis(genesis_path)
        self.datadir = datadir
        directory = chunk_directory(genesis_path, self.genesis)
        self.chunk_directory = directory
        self.chain = Chain(
            self.genesis,
            validation_text=load_split(self.genesis.dataset, directory, "validation"),
            test_text=load_split(self.genesis.dataset, directory, "test"),
            backend=backend or default_backend("cpu"),
        )
        self.lock = threading.RLock()
        """Held by every method; callers composing several calls hold it too."""
        self.received_at: dict[bytes, float] = {}
        """Wall-clock time (Unix seconds) each block was first imported here."""
        self._losses: dict[bytes, tuple[float, float]] = {}
        self.orphaned: list[str] = []
        """Hashes of valid blocks that finality dropped from the store (they lost a race)."""
        first_state = genesis_state(self.genesis)
        first_block = genesis_block(self.genesis, first_state)
        self.genesis_block = first_block
        self.db = ChainDB(datadir / "chain", bytes.fromhex(self.genesis.hash), first_block, first_state)
        finalized = self.db.finalized()
        self.store = Store.from_anchor(
            self.chain, self.db.block(finalized), self.db.state(finalized), self.db.confirmed_gain(finalized)
        )
        self.store.on_tick(int(time.time()))
        head = self.db.head()
        anchor_height = self.db.block(finalized).header.height
        head_height = self.db.block(head).header.height
        for height in range(anchor_height + 1, head_height + 1):
            block_hash = self.db.canonical_hash(height)
            try:  # the blocks above the anchor are not final: check them again
                if block_hash is None:
                    raise KeyError(f"no canonical block at height {height}")
                self.store.on_block(self.db.block(block_hash))
            except (InvalidBlock, KeyError, DecodeError) as error:
                raise CorruptStore(f"{datadir}: stored block at height {height} does not validate: {error}") from None

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # --- writes ---------------------------------------------------------------

    def import_block(self, data: bytes) -> HeadChange:
        """Decode, validate and store a block; raises DecodeError or InvalidBlock."""
        return self.import_encoded(data).change

    def import_encoded(self, data: bytes) -> ImportResult:
        """`import_block`, also saying whether the block was new."""
        block = decode_block(data)
        return self.import_decoded(block)

    def import_decoded(self, block: Block) -> ImportResult:
        with self.lock:
            if self.is_known(block):
                return ImportResult(block, True, HeadChange(self.store.head, self.store.head, (), ()))
            self.store.on_tick(int(time.time()))
            before, anchor = dict(self.store.nodes), self.store.finalized
            change = self.store.on_block(block)
            node = self.store.nodes[block.hash]
            if self.store.finalized != anchor:
                final: set[bytes] = set()  # the new anchor and its ancestors: pruned because they are final
                cursor = before.get(self.store.finalized)
                while cursor is not None:
                    final.add(cursor.block.hash)
                    cursor = before.get(cursor.block.header.parent)
                self.orphaned += [h.hex() for h in before if h not in self.store.nodes and h not in final]
            self.db.import_block(
                block,
                node.state,
                node.confirmed_gain,
                change.new_head,
                change.new_canonical,
                change.old_canonical,
                self.store.finalized,
            )
            self.received_at.setdefault(block.hash, time.time())
            return ImportResult(block, False, change)

    def on_attestation(self, attestation: Attestation) -> Evidence | None:
        """Validate and keep an attestation (raises InvalidBlock)."""
        with self.lock:
            return self.store.on_attestation(attestation)

    def on_evidence(self, evidence: Evidence) -> bool:
        """Validate and keep equivocation evidence for the next validation block;
        False when the offender's evidence is already kept (raises InvalidBlock)."""
        with self.lock:
            offender = evidence.first.validator
            if offender in self.store.evidence:
                return False
            state = self.store.nodes[self.store.get_checkpoint()].state
            validate_evidence(state, evidence.first, evidence.second, self.chain)
            self.store.evidence[offender] = evidence
            return True

    # --- reads ------------------------------------------------------------------

    def checkpoint(self) -> tuple[Block, State]:
        """Where new training blocks build (genesis or the head chain's last
        validation block) and its state."""
        with self.lock:
            node = self.store.nodes[self.store.get_checkpoint()]
            return node.block, node.state

    def anchor(self) -> Block:
        """The last finalized training block (or genesis): every block above it is
        still open, sibling validation blocks of it included."""
        with self.lock:
            return self.store.nodes[self.store.finalized].block

    def head(self) -> tuple[Block, State]:
        with self.lock:
            node = self.store.nodes[self.store.head]
            return node.block, node.state

    def is_known(self, block: Block) -> bool:
        """In the fork-choice store, or stored at or below the anchor (final, or lost to it).

        A block stored above the anchor but not in the store (a branch the
        store dropped on a restart, which reloads only the canonical chain)
        is not known: importing it puts it back."""
        with self.lock:
            if block.hash in self.store.nodes:
                return True
            anchor_height = self.store.nodes[self.store.finalized].block.header.height
            return block.header.height <= anchor_height and self.db.has_block(block.hash)

    def in_store(self, block_hash: bytes) -> bool:
        """In the fork-choice store: at or above the anchor, and importable on."""
        with self.lock:
            return block_hash in self.store.nodes

    def has_block(self, block_hash: bytes) -> bool:
        with self.lock:
            return block_hash in self.store.nodes or self.db.has_block(block_hash)

    def block_by_hash(self, block_hash: bytes) -> Block | None:
        with self.lock:
            node = self.store.nodes.get(block_hash)
            if node is not None:
                return node.block
            if not self.db.has_block(block_hash):
                return None
            return self.db.block(block_hash)

    def block_at(self, height: int) -> Block | None:
        """The canonical block at a height, if any."""
        with self.lock:
            if height < 0:
                return None
            block_hash = self.db.canonical_hash(height)
            return None if block_hash is None else self.db.block(block_hash)

    def encoded_block(self, block_hash: bytes) -> bytes | None:
        block = self.block_by_hash(block_hash)
        return None if block is None else block.encode()

    def slice_content(self, slice_hash: bytes) -> bytes | None:
        """A slice's content by its SHA-256 (any stored state's)."""
        with self.lock:
            return self.db.slice_content(slice_hash)

    def state_of(self, block_hash: bytes) -> State | None:
        with self.lock:
            node = self.store.nodes.get(block_hash)
            if node is not None:
                return node.state
            if not self.db.has_block(block_hash):
                return None
            return self.db.state(block_hash)

    def weights_of(self, state: State) -> CanonicalWeights:
        with self.lock:
            return self.chain.weights(state)

    def account(self, address: bytes) -> Account | None:
        with self.lock:
            return self.head()[1].accounts.get(address)

    def pending_training_blocks(self) -> list[Block]:
        with self.lock:
            return self.store.pending_training_blocks()

    def attestations_for(self, training_block: bytes) -> list[Attestation]:
        with self.lock:
            return list(self.store.attestations.get(training_block, {}).values())

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
        """The assignment for a training block by `miner` on the finalized checkpoint."""
        with self.lock:
            parent, state = self.checkpoint()
            return WorkAssignment(
                parent_hash=parent.hash,
                height=parent.header.height + 1,
                state_root=state.root,
                slice_id=compute_assigned_slice(parent.header, miner, self.genesis.partition.slices),
                difficulty=state.difficulty,
                validation_seed=compute_validation_seed(parent.hash),
                training_seed=compute_training_seed(parent.hash, miner),
                min_timestamp=parent.header.timestamp + 1,
            )


def mean_loss(chain: Chain, state: State, split: str) -> float:
    """Nats per token on the split's report batch (seed 0): informative only."""
    sequences = chain.genesis.evaluation.validation_sequences
    if split == "test":
        sequences = chain.genesis.evaluation.test_sequences
    tokens = sequences * chain.genesis.model.context
    return round(chain.loss(state, split, seed_from_int(0)) / tokens / (1 << LOSS_BITS), 5)
