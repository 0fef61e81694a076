"""A node's decided chain and its LevelDB store, kept in step: the voting rounds' counterpart of `FullNode`.

Every decided block enters through `import_decided` (a block with its commit
certificate, from the node's own voting or from sync): validated by the
decided chain (consensus/decided_chain.py), then written in one atomic batch
with its certificate and the training blocks it names. A decided block is
final, so a restart needs no re-validation: the head, its state, its
certificate and the validator set that voted on it are read back, and the
node resumes deciding the next height. Training blocks on the head and
checked candidates live in memory (peers gossip them again).

The networked node, the RPC and the miner share one `DecidedNode`; every
method takes its lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

from chain.blocks import Block, DecidedBody, Kind
from chain.encoding import DecodeError
from chain.state import State
from chain.store import ChainDB, CorruptStore
from chain.votes import Commit
from consensus.decided_chain import DecidedChain, Decision
from consensus.decisions import get_validator_set
from consensus.rules import Chain, genesis_block, genesis_state
from genesis import chunk_directory, load_genesis
from training.data import load_split
from training.evaluate import default_backend


class DecidedNode:
    """One node's decided chain, shared by its network loop, RPC and miner."""

    def __init__(self, genesis_path: Path, datadir: Path, backend: str | None = None) -> None:
        self.genesis_path = genesis_path
        self.genesis = load_genesis(genesis_path)
        self.datadir = datadir
        directory = chunk_directory(genesis_path, self.genesis)
        self.chain = Chain(
            self.genesis,
            validation_text=load_split(self.genesis.dataset, directory, "validation"),
            test_text=load_split(self.genesis.dataset, directory, "test"),
            backend=backend or default_backend("cpu"),
        )
        self.lock = threading.RLock()
        """Held by every method; callers composing several calls hold it too."""
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
        self.decided.on_tick(int(time.time()))

    def _load_head(self, first_state: State) -> DecidedChain:
        head = self.db.block(self.db.head())
        if head.header.kind == Kind.GENESIS:
            return DecidedChain.from_genesis(self.chain, self.genesis_block, first_state)
        if head.header.kind != Kind.DECIDED or not isinstance(head.body, DecidedBody):
            raise CorruptStore(
                f"{self.datadir}: the head is a {head.header.kind.name.lower()} block: "
                "this data directory holds a chain finalized by attestations, not by voting rounds"
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
            return self.decided.on_training_block(block)

    def check_candidate(self, block: Block, training_blocks: Mapping[bytes, Block]) -> State:
        """Check a block proposed for the next height (raises InvalidBlock)."""
        with self.lock:
            self.decided.on_tick(int(time.time()))
            return self.decided.on_candidate(block, training_blocks)

    def import_decided(
        self, block: Block, commit: Commit, training_blocks: Mapping[bytes, Block] | None = None
    ) -> Decision:
        """The next height is decided: validate the block and its certificate, store them."""
        with self.lock:
            decision = self.decided.on_decided(block, commit, training_blocks)
            self.store(decision)
            return decision

    def store(self, decision: Decision) -> None:
        """Write a decision the decided chain already took (the voting's `Decided`)."""
        assert decision.commit is not None
        with self.lock:
            self.db.import_decision(decision.block, decision.state, decision.commit, decision.training_blocks)

    # --- reads ------------------------------------------------------------------

    def head(self) -> Decision:
        with self.lock:
            return self.decided.head

    def block_at(self, height: int) -> Block | None:
        """The decided block at a height (genesis at 0), if decided."""
        with self.lock:
            block_hash = self.db.canonical_hash(height) if height >= 0 else None
            return None if block_hash is None else self.db.block(block_hash)

    def commit_of(self, block_hash: bytes) -> Commit | None:
        with self.lock:
            return self.db.commit(block_hash)

    def block_by_hash(self, block_hash: bytes) -> Block | None:
        """A stored block (decided or named training block), a kept training block, or a checked candidate."""
        with self.lock:
            if block_hash in self.decided.training:
                return self.decided.training[block_hash]
            candidate = self.decided.candidate_blocks.get(block_hash)
            if candidate is not None:
                return candidate[0]
            return self.db.block(block_hash) if self.db.has_block(block_hash) else None
