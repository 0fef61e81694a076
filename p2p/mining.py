"""A miner's commit-reveal steps (docs/spec.md, section 17), shared by the node's miner
(`VotingNode._mine_loop`), the external miner (`potchain mine`) and `potchain localnet`.

While height h + 1 is being decided on head D (height h), a miner fixes an update for
the slice the block of height h + 1 assigns (`compute_next_slice(h + 1)`, every miner's),
signs a commitment to it for height h + 1 and gossips it (`prepare_update`); the proposer
of that block carries it. Once block h + 1 is decided and carries the commitment, the
miner reveals the update as a training block on it, with exactly the committed weights
(`reveal_update`): the validation batch of that block is seeded by its parent and miner,
and the parent did not exist when the update was fixed. The next decided block tests it
on held-out data; a committed update it applies pays its miner.

The update's values are chosen before committing, as `propose_best_training_block` does:
the first of 1, 1/2 and 1/4 of the move from the chain's slice toward the miner's values
whose validation gain against D's state meets the difficulty, else the largest gain. D's
state and batch stand in for block h + 1's, which do not exist yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from chain.blocks import Block, DecidedBody, TrainingBody, UpdateCommitment, compute_update_hash, sign_update_commitment
from chain.crypto import PrivateKey
from chain.state import State
from consensus.decided_chain import DecidedChain
from consensus.decisions import get_committed_updates
from consensus.proposals import propose_training_block
from consensus.rules import Chain, compute_assigned_slice, compute_next_slice, compute_validation_seed
from p2p.decided_node import DecidedNode
from training.miner import Miner, Work
from training.weights import CanonicalWeights

FRACTIONS = (1.0, 0.5, 0.25)
"""The moves toward the miner's values tried before committing (as `propose_best_training_block`)."""


@dataclass(frozen=True)
class PreparedUpdate:
    """An update a miner committed to (or is about to), kept until it is revealed."""

    commitment: UpdateCommitment
    """The signed commitment, for the decided block of `commitment.height`."""
    slice_id: int
    """The slice the update sets: the miner's on the block of `commitment.height`."""
    weights: bytes
    """The slice's committed values, int16 little-endian (what the commitment's hash covers)."""
    steps: int
    """Optimizer steps behind it (informative, carried by the training block)."""
    expected_gain: int
    """Its validation gain against the head it was prepared on (a stand-in for the reveal's)."""

    @property
    def height(self) -> int:
        """The decided block that carries the commitment; the update is revealed on it."""
        return self.commitment.height

    @property
    def update_hash(self) -> bytes:
        return self.commitment.update_hash


def choose_update_values(
    chain: Chain, head: Block, state: State, key: PrivateKey, slice_id: int, values: np.ndarray
) -> tuple[bytes, int]:
    """The committed slice values and their validation gain against `head`'s state and the
    batch seeded by `head` and `key`: the first fraction of the move toward `values` whose
    gain meets the difficulty, else the one with the largest gain."""
    seed = compute_validation_seed(head.hash, key.public_key)
    current = chain.layout.extract(chain.weights(state), slice_id).astype(np.int64)
    before = chain.loss(state, "validation", seed)
    best: tuple[bytes, int] | None = None
    for fraction in FRACTIONS:
        moved = np.floor(current + fraction * (values.astype(np.int64) - current) + 0.5).astype("<i2").tobytes()
        gain = before - chain.loss(state.with_slice(slice_id, moved), "validation", seed)
        if best is None or gain > best[1]:
            best = (moved, gain)
        if gain >= state.difficulty:
            return moved, gain
    assert best is not None
    return best


def prepare_update(
    chain: Chain, head: Block, state: State, key: PrivateKey, values: np.ndarray, steps: int
) -> PreparedUpdate:
    """`key`'s update for the decided block after `head` (state `state`), toward the slice
    `values` of the miner's model for the slice assigned on that block, and its signed
    commitment. The caller commits it only if `expected_gain` meets the difficulty."""
    height = head.header.height + 1
    slice_id = compute_next_slice(height, chain.genesis.partition.slices)
    weights, gain = choose_update_values(chain, head, state, key, slice_id, values)
    update_hash = compute_update_hash(key.public_key, slice_id, weights)
    commitment = sign_update_commitment(key, chain.domain, height, update_hash)
    return PreparedUpdate(commitment, slice_id, weights, steps, gain)


def is_carried(parent: Block, update: PreparedUpdate) -> bool:
    """Whether decided block `parent` carries the commitment to `update` (so revealing it on
    `parent` makes a committed training block)."""
    miner = update.commitment.miner
    return parent.header.height == update.height and get_committed_updates(parent).get(miner) == update.update_hash


def reveal_update(
    chain: Chain,
    parent: Block,
    state: State,
    key: PrivateKey,
    update: PreparedUpdate,
    timestamp: int,
    state_root: bytes | None = None,
) -> Block:
    """The training block on `parent` (the decided block that carries the commitment) with
    exactly the committed weights; the caller publishes it if its gain meets the difficulty.
    `state_root` as in `propose_training_block` (an external miner holding only the model)."""
    if parent.header.height != update.height:
        raise ValueError(f"reveal: parent at height {parent.header.height}, want {update.height}")
    assigned = compute_assigned_slice(parent.header, chain.genesis.partition.slices)
    if assigned != update.slice_id:
        raise ValueError(f"reveal: slice {update.slice_id}, want {assigned} (the parent assigns it)")
    values = np.frombuffer(update.weights, dtype="<i2")
    block = propose_training_block(chain, parent, state, key, values, timestamp, update.steps, state_root)
    assert isinstance(block.body, TrainingBody) and block.body.weights == update.weights
    return block


def validation_gain(block: Block) -> int:
    """A training block's claimed validation gain."""
    body = block.body
    assert isinstance(body, TrainingBody)
    return body.loss_before - body.loss_after


def find_applied(
    revealed: Mapping[bytes, Block], head: Block, block_at: Callable[[int], Block | None]
) -> list[tuple[Block, Block]]:
    """Our revealed training blocks that the decided chain up to `head` applied, each with the
    decided block that applied it, lowest height first. A training block on decided block h is
    judged by block h + 1 (its header's height): `head` itself or, when the head moved by more
    than one height since the miner last looked, an earlier block (`block_at`, the canonical
    block at a height), which the miner reports as well (what its model records is
    `find_settled`'s)."""
    found: list[tuple[Block, Block]] = []
    for block in revealed.values():
        height = block.header.height
        if height > head.header.height:
            continue  # not judged yet
        judge = head if height == head.header.height else block_at(height)
        if judge is not None and isinstance(judge.body, DecidedBody) and block.hash in judge.body.applied:
            found.append((block, judge))
    return sorted(found, key=lambda pair: pair[0].header.height)


def find_settled(
    offers: Mapping[int, PreparedUpdate], head: Block, block_at: Callable[[int], Block | None]
) -> list[tuple[PreparedUpdate, Block]]:
    """Our offers whose slice the decided chain up to `head` has settled, each with the decided
    block that settled it, lowest height first. An offer for decided block h (the update we
    committed to for it, or last tried to) sets the slice h assigns, as every miner's update on
    h does; block h + 1 judges them all (`head` itself or an earlier block, `block_at`). When it
    applies any of them (ours, others', or a combination), the chain's values for that slice
    replace what we offered: the miner records our offered values as the slice's base
    (`Miner.published`), so the next rebase moves our model by the chain's values less our
    offer and keeps only the progress made since. Miners whose offers lost would otherwise add
    the winner's change on top of their own progress toward the same data, and drift: past
    the first dozen heights they stopped gaining on the head at all (docs/benchmarks.md). A
    block that applies nothing settles nothing: the local model keeps its progress."""
    found: list[tuple[PreparedUpdate, Block]] = []
    for height, offer in offers.items():
        if height + 1 > head.header.height:
            continue  # not judged yet
        judge = head if height + 1 == head.header.height else block_at(height + 1)
        if judge is not None and isinstance(judge.body, DecidedBody) and judge.body.applied:
            found.append((offer, judge))
    return sorted(found, key=lambda pair: pair[1].header.height)


def get_awaited_miners(decided: DecidedChain) -> set[bytes]:
    """The miners a proposer waits for (node policy, docs/spec.md section 12): each revealed on
    the head the update the head carries its commitment to, and has not yet committed for the
    next height. Such a miner is training its next round; proposing before its commitment
    arrives would leave that round out of the next height. Read without the node's lock: the
    mappings are copied first (one step each in CPython), never iterated while another
    thread may change them."""
    training, committed, commitments = dict(decided.training), dict(decided.committed), dict(decided.commitments)
    revealed = {block.header.proposer for block_hash, block in training.items() if committed.get(block_hash)}
    return revealed - commitments.keys()


@dataclass(frozen=True)
class TrainingRound:
    """One training round of a miner: what it cost and the loss it trained at (informative)."""

    steps: int
    """Optimizer steps."""
    tokens: int
    """Tokens trained on (steps x batch sequences x context)."""
    seconds: float
    """Wall-clock time the round took."""
    loss: float
    """Mean training loss over the round's steps, nats per token."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_round(miner: Miner, weights: CanonicalWeights, slice_id: int, seed: bytes) -> tuple[Work, TrainingRound]:
    """`miner.work` on a head's weights, timed: the work and what the round cost."""
    started = time.perf_counter()
    work = miner.work(weights, slice_id, seed)
    seconds = time.perf_counter() - started
    tokens = work.steps * miner.sequences_per_step * miner.model.config.context
    return work, TrainingRound(work.steps, tokens, seconds, work.training_loss)


@dataclass
class SettledValues:
    """Our offered values whose slice the chain settled (`find_settled`) and the local model has not
    been told of: (the height of the decided block that settled it, slice, values). A miner's
    training tells it of those up to the head a round trains on, just before the round's rebase
    (`take`): told earlier, while a round is about to rebase onto an older head's weights (read
    under the node's lock, which a candidate's check can hold for seconds), the rebase would
    take the chain's older values of that slice for its change and subtract our progress."""

    entries: list[tuple[int, int, np.ndarray]] = field(default_factory=list)

    def record(self, height: int, slice_id: int, values: np.ndarray) -> None:
        """The decided block at `height` settled the slice we offered these values for."""
        self.entries.append((height, slice_id, values))

    def take(self, height: int) -> list[tuple[int, np.ndarray]]:
        """The (slice, values) of ours settled at heights up to `height`, lowest first; removed."""
        taken = sorted((entry for entry in self.entries if entry[0] <= height), key=lambda entry: entry[0])
        self.entries = [entry for entry in self.entries if entry[0] > height]
        return [(slice_id, values) for _, slice_id, values in taken]


@dataclass
class MiningProgress:
    """Where a miner's commit-reveal pipeline stands (the node's and the external miner's loops)."""

    head: bytes = b""
    """The decided head the miner last acted on."""
    trained_on: bytes = b""
    """The decided head whose weights the miner last trained on."""
    snapshot: list[np.ndarray] | None = None
    """The local model's values for every slice after the latest training round (None before one)."""
    snapshot_round: int = 0
    """Training rounds done (the snapshot's)."""
    tried_round: int = -1
    """The snapshot round the latest commitment attempt on the current head used."""
    steps: int = 0
    """Optimizer steps of the latest training round (carried by the next update)."""
    committed: dict[int, PreparedUpdate] = field(default_factory=dict)
    """Our committed updates not yet revealed, by the height of the decided block that carries each."""
    revealed: dict[bytes, Block] = field(default_factory=dict)
    """Our revealed training blocks not yet judged, by hash."""
    published_at: float = 0.0
    """When (trio time) the latest commitment was last gossiped."""
    offered: dict[int, PreparedUpdate] = field(default_factory=dict)
    """Our latest update for each decided block not yet judged (committed or only tried), by its height."""
    settled: SettledValues = field(default_factory=SettledValues)
    """Our offered values whose slice the chain settled (`find_settled`), not yet told to the local model."""

    def may_train_on(self, head: bytes) -> bool:
        """Whether a training round may start on decided head `head`: not trained on yet, and the
        mining loop has acted on it (recorded the slices it settled, so the round's rebase moves
        our model by the chain's values less our offer, not less the chain's previous values)."""
        return self.trained_on != head and self.head == head


def held_commitment(node: DecidedNode, miner: bytes) -> UpdateCommitment | None:
    """The commitment of `miner` the node holds for the block being decided, if any."""
    with node.lock:
        return node.decided.commitments.get(miner)


class BackgroundTrainer:
    """A miner trained in a thread of its own, one round per decided head it is given, each
    round ending in a snapshot of its values: for a miner whose loop must act on each new head
    at once (commit, reveal) while training takes longer than a height (`potchain mine`)."""

    def __init__(
        self,
        miner: Miner,
        after_round: Callable[[Miner], None] | None = None,
        on_round: Callable[[TrainingRound], None] | None = None,
    ) -> None:
        self.miner = miner
        self.after_round = after_round
        """Called in the training thread after each round (to save the miner's state, say)."""
        self.on_round = on_round
        """Called in the training thread with each round's cost and loss (to report progress)."""
        self._condition = threading.Condition()
        self._target: tuple[bytes, int, CanonicalWeights, int, bytes] | None = None
        self._settled = SettledValues()  # told to the miner before a round's rebase (`published`)
        self._snapshot: tuple[int, list[np.ndarray] | None, int] = (0, None, 0)
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        self._thread.start()

    def train_on(self, head: bytes, height: int, weights: CanonicalWeights, slice_id: int, seed: bytes) -> None:
        """Train the next round on the weights of a head at `height` (a round in progress finishes first)."""
        with self._condition:
            self._target = (head, height, weights, slice_id, seed)
            self._condition.notify()

    def latest(self) -> tuple[int, list[np.ndarray] | None, int]:
        """(rounds done, the latest snapshot or None, that round's optimizer steps); raises the
        training thread's error if it failed."""
        with self._condition:
            if self._error is not None:
                raise self._error
            return self._snapshot

    def published(self, height: int, slice_id: int, values: np.ndarray) -> None:
        """The decided block at `height` settled the slice we offered `values` for: the training thread tells
        the miner (`Miner.published`) before the first round on a head at that height or above
        (`SettledValues` says why not at once)."""
        with self._condition:
            self._settled.record(height, slice_id, values)

    def stop(self) -> None:
        """Stop after the round in progress, and wait for it (a process must not exit while
        its training thread runs torch)."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        trained = b""
        try:
            while True:
                with self._condition:
                    while not self._stopping and (self._target is None or self._target[0] == trained):
                        self._condition.wait()
                    if self._stopping or self._target is None:
                        return
                    trained, height, weights, slice_id, seed = self._target
                    settled = self._settled.take(height)
                for settled_slice, values in settled:
                    self.miner.published(settled_slice, values)
                work, finished = train_round(self.miner, weights, slice_id, seed)
                snapshot = self.miner.snapshot(weights)
                if self.after_round is not None:
                    self.after_round(self.miner)
                if self.on_round is not None:
                    self.on_round(finished)
                with self._condition:
                    self._snapshot = (self._snapshot[0] + 1, snapshot, work.steps)
        except BaseException as error:
            with self._condition:
                self._error = error
