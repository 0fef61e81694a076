"""The decided chain: one decided block per height, each final with its commit certificate.

`DecidedChain` is the node's chain (docs/spec.md, sections 10, 15 and 16):
there is no fork choice, no branches to choose between, only the next
height to decide by voting rounds. It holds the
head (the last decided block, its state and commit), the valid training
blocks built on it (the next proposal's inputs), and the candidate blocks
for the next height that were checked (the voting's `CheckBlock`).

Event handlers validate first and change nothing unless the input is valid
(`InvalidBlock` names the rule): `on_training_block`, `on_commitment` (a
miner's commitment to an update it reveals on the next decided block), `on_candidate` (check a
proposed block; the result is kept, so each candidate costs its evaluations
once) and `on_decided` (a block with its commit certificate: the head
advances). Pure and synchronous: the node persists what they accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from chain.blocks import (
    MAX_COMMITMENTS,
    MAX_TRAINING_PER_HEIGHT,
    Block,
    DecidedBody,
    Kind,
    TrainingBody,
    UpdateCommitment,
)
from chain.state import State
from chain.votes import Commit
from consensus.decisions import apply_decided_block, get_validator_set, is_committed
from consensus.rules import Chain, InvalidBlock, StaleBlock, UnknownParent, apply_training_block
from consensus.voting import InvalidVote, ValidatorSet, validate_commit

MAX_PENDING_TRAINING = 64
"""Valid training blocks kept on the head (the best by validation gain are kept)."""
MAX_CANDIDATES = 64
"""Checked candidate blocks kept for the next height."""


@dataclass(frozen=True)
class Decision:
    """A decided height, as the node stores it."""

    block: Block
    """The decided block."""
    state: State
    """The state after it."""
    commit: Commit | None
    """Its commit certificate (None for genesis)."""
    training_blocks: tuple[Block, ...]
    """The training blocks it names."""


@dataclass
class DecidedChain:
    """The last decided block and what the next height is decided from."""

    chain: Chain
    head: Decision
    """The last decided block (genesis at first)."""
    head_validators: ValidatorSet | None
    """The validators who voted on the head's height (None for genesis): the
    next block's `last_commit` is checked against them."""
    time: int = 0
    """The node's clock (Unix seconds), for the future-timestamp rule."""
    training: dict[bytes, Block] = field(default_factory=dict)
    """Valid training blocks on the head, by hash."""
    candidates: dict[bytes, State | None] = field(default_factory=dict)
    """Candidate blocks for the next height that were checked: their state, or None if invalid."""
    candidate_blocks: dict[bytes, tuple[Block, dict[bytes, Block]]] = field(default_factory=dict)
    """The valid candidates themselves, with the training blocks they name."""
    committed: dict[bytes, bool] = field(default_factory=dict)
    """Whether each kept training block's update is committed in the head (hashed once, on arrival)."""
    commitments: dict[bytes, UpdateCommitment] = field(default_factory=dict)
    """Miners' commitments for the next decided block, by miner (the first of each, at most MAX_COMMITMENTS)."""

    @classmethod
    def from_genesis(cls, chain: Chain, genesis: Block, state: State) -> DecidedChain:
        return cls(chain, Decision(genesis, state, None, ()), None)

    # --- queries ----------------------------------------------------------------

    @property
    def height(self) -> int:
        """The height being decided next."""
        return self.head.block.header.height + 1

    def validators(self) -> ValidatorSet:
        """The validators who vote on the next height."""
        return get_validator_set(self.head.state, self.chain.genesis)

    def get_best_training_block(self) -> Block | None:
        """The first of `get_training_candidates` (None if there is none)."""
        candidates = self.get_training_candidates()
        return candidates[0] if candidates else None

    def get_training_candidates(self) -> list[Block]:
        """The training blocks a proposer tests: those whose update was committed in the head
        (at most MAX_TRAINING_PER_HEIGHT) or, when none was, the one uncommitted block with the
        largest claimed validation gain. Ties go to the first kept (a miner re-signing variants
        of its block cannot displace the one every validator already holds). An uncommitted
        block is never paid and ranks below any committed one that gains (docs/spec.md,
        section 17.3): testing it beside committed ones would cost every validator an
        evaluation for an update that rarely counts (copies, mostly)."""
        ranked = sorted(self.training.values(), key=self._rank)
        committed = [block for block in ranked if self.committed[block.hash]]
        return committed[:MAX_TRAINING_PER_HEIGHT] if committed else ranked[:1]

    def _rank(self, block: Block) -> tuple[bool, int, int]:
        committed = self.committed[block.hash]
        return (not committed, rank_training_block(block), list(self.training).index(block.hash))

    # --- events -----------------------------------------------------------------

    def on_tick(self, time: int) -> None:
        self.time = max(self.time, time)

    def on_training_block(self, block: Block) -> bool:
        """Keep a valid training block on the head; False if already kept.
        Raises StaleBlock (built on an earlier decided block), UnknownParent, or InvalidBlock."""
        if block.hash in self.training:
            return False
        if block.header.kind != Kind.TRAINING:
            raise InvalidBlock(f"kind: {block.header.kind.name}, want TRAINING")
        self._check_time(block)
        if block.header.parent != self.head.block.hash:
            if block.header.height <= self.head.block.header.height:
                raise StaleBlock(f"parent: built on height {block.header.height - 1}, decided up to {self.height - 1}")
            raise UnknownParent(f"parent: unknown block {block.header.parent.hex()}")
        apply_training_block(self.head.state, self.head.block, block, self.chain)
        self.training[block.hash] = block
        self.committed[block.hash] = is_committed(self.head.block, block)
        if len(self.training) > MAX_PENDING_TRAINING:
            worst = max(self.training.values(), key=self._rank)
            del self.training[worst.hash]
            del self.committed[worst.hash]
        return True

    def on_commitment(self, commitment: UpdateCommitment) -> bool:
        """Keep a miner's commitment for the next decided block; False if it holds one of
        that miner's already or is full. Raises StaleBlock (for a decided height),
        UnknownParent (for a later one) or InvalidBlock (not signed by its miner)."""
        if commitment.height < self.height:
            raise StaleBlock(f"commitment: for height {commitment.height}, deciding {self.height}")
        if commitment.height > self.height:
            raise UnknownParent(f"commitment: for height {commitment.height}, deciding {self.height}")
        if not commitment.is_signed_by_miner(self.chain.domain):
            raise InvalidBlock("commitment: not signed by its miner")
        if commitment.miner in self.commitments or len(self.commitments) >= MAX_COMMITMENTS:
            return False
        self.commitments[commitment.miner] = commitment
        return True

    def on_candidate(self, block: Block, training_blocks: Mapping[bytes, Block]) -> State:
        """Check a block proposed for the next height (raises InvalidBlock); the outcome is kept."""
        known = self.candidates.get(block.hash, ...)
        if isinstance(known, State):
            return known
        if known is None:
            raise InvalidBlock(f"candidate {block.hash.hex()[:16]}: invalid (checked before)")
        try:
            state = self._apply(block, training_blocks)
        except InvalidBlock:
            self._remember(block, None, {})
            raise
        self._remember(block, state, dict(training_blocks))
        return state

    def on_decided(
        self, block: Block, commit: Commit, training_blocks: Mapping[bytes, Block] | None = None
    ) -> Decision:
        """The next height is decided: `block`, with its commit certificate (and the
        training blocks it names; by default those it was checked with as a candidate)."""
        if training_blocks is None:
            training_blocks = self.candidate_blocks.get(block.hash, (block, {}))[1]
        if block.header.height != self.height:
            raise StaleBlock(f"height: {block.header.height}, deciding {self.height}")
        if (commit.height, commit.block_hash) != (block.header.height, block.hash):
            raise InvalidBlock(f"commit: for height {commit.height} block {commit.block_hash.hex()[:16]}")
        validators = self.validators()
        try:
            validate_commit(commit, validators, self.chain.domain)
        except InvalidVote as error:
            raise InvalidBlock(str(error)) from None
        state = self.candidates.get(block.hash)
        if state is None:  # not checked, or found invalid: a certificate from a quorum says otherwise, check again
            state = self._apply(block, training_blocks, check_time=False)
        body = block.body
        assert isinstance(body, DecidedBody)
        named = tuple(training_blocks[verdict.training_block] for verdict in body.training)
        self.head = Decision(block, state, commit, named)
        self.head_validators = validators
        self.training.clear()
        self.committed.clear()
        self.candidates.clear()
        self.candidate_blocks.clear()
        self.commitments.clear()
        return self.head

    # --- internals ----------------------------------------------------------------

    def _apply(self, block: Block, training_blocks: Mapping[bytes, Block], check_time: bool = True) -> State:
        """The state after a block for the next height. The future-timestamp rule
        guards what a validator votes for; a block with a certificate is already decided."""
        if block.header.kind != Kind.DECIDED:
            raise InvalidBlock(f"kind: {block.header.kind.name}, want DECIDED")
        if block.header.height != self.height:
            raise StaleBlock(f"height: {block.header.height}, deciding {self.height}")
        if check_time:
            self._check_time(block)
        return apply_decided_block(
            self.head.state, self.head.block, block, training_blocks, self.head_validators, self.chain
        )

    def _check_time(self, block: Block) -> None:
        limit = self.time + self.chain.genesis.consensus.max_future_seconds
        if block.header.timestamp > limit:
            raise InvalidBlock(f"timestamp: {block.header.timestamp} is in the future (limit {limit})")

    def _remember(self, block: Block, state: State | None, training_blocks: dict[bytes, Block]) -> None:
        if len(self.candidates) >= MAX_CANDIDATES:
            oldest = next(iter(self.candidates))
            del self.candidates[oldest]
            self.candidate_blocks.pop(oldest, None)
        self.candidates[block.hash] = state
        if state is not None:
            self.candidate_blocks[block.hash] = (block, training_blocks)


def rank_training_block(block: Block) -> int:
    """Largest claimed validation gain first (ties: the caller's order)."""
    body = block.body
    gain = body.loss_before - body.loss_after if isinstance(body, TrainingBody) else 0
    return -gain
