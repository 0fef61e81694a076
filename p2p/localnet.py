"""`potchain localnet`'s network, in one process: a decided node whose voting holds every validator key.

`LocalVoting` runs one `NodeVoting` (p2p/voting.py) holding all the devnet
validator keys on one `DecidedNode`, and carries out its effects as the
networked node (p2p/voting_node.py) does, without a network:

- `Send`: the networked node gossips the message to its peers and never
  feeds its own messages back to itself; `NodeVoting` already gave each of
  its keys' messages to its other keys' machines, and there are no peers
  here, so nothing is left to do;
- `CheckCandidate`: the block and the training blocks it names come from the
  node (nobody else holds them), are checked with `DecidedNode.check_candidate`,
  and the outcome goes to `on_block_checked`;
- `BuildBlock`: `build_block`, then `on_value`;
- `Decided`: `DecidedNode.store`, which writes the decision in one atomic batch;
- `SetTimer`: kept on a virtual clock and fired, earliest first, only when no
  other effect is pending (every message arrives at once, so waiting for a
  timer in real time would change nothing but the run's length).

The CPU miner commits, then reveals (p2p/mining.py): `commit_update` trains on the
decided head and puts its commitment for the next decided block into the node before
that height is decided (its proposer carries it); once decided, `reveal_committed_update`
reveals the update on it, for the height after to test, apply and pay.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from chain.blocks import Block, DecidedBody
from chain.crypto import PrivateKey
from chain.heldout import Shard
from chain.store import ChainDB
from consensus.decided_chain import Decision
from consensus.rules import InvalidBlock, compute_next_slice, compute_training_seed
from genesis import devnet_shard
from p2p.decided_node import DecidedNode
from p2p.mining import PreparedUpdate, is_carried, prepare_update, reveal_update, validation_gain
from p2p.signer import SignerRecord
from p2p.voting import BuildBlock, CheckCandidate, Decided, Effect, NodeVoting, Send, SetTimer
from training.miner import Miner

MAX_TIMEOUTS_PER_HEIGHT = 64
"""Timeouts fired at one height before giving up on it. Every message arrives at once,
so an undecided height is stuck (see `Stalled`), not slow."""


class Stalled(Exception):
    """The height cannot be decided in this process: no effect pending and no timer left,
    or more than MAX_TIMEOUTS_PER_HEIGHT timeouts fired (say the validators locked, before a
    restart, on a block that only the killed process held)."""


@dataclass
class LocalVoting:
    """See the module docstring."""

    node: DecidedNode
    voting: NodeVoting
    pending: deque[Effect] = field(default_factory=deque)
    """Effects not yet carried out, in order."""
    timers: list[tuple[int, int, SetTimer]] = field(default_factory=list)
    """Pending timers by (due time on the virtual clock in milliseconds, arrival order)."""
    clock_ms: int = 0
    """The virtual clock: the due time of the latest timer fired."""
    sequence: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def open(cls, node: DecidedNode, keys: list[PrivateKey]) -> LocalVoting:
        """Voting with every key in `keys` on `node`'s decided chain, its signer record in the node's datadir."""
        record = SignerRecord.open(node.datadir / "signer")
        voting = NodeVoting(
            node.decided,
            {key.public_key: key for key in keys},
            record,
            node.genesis.consensus.timeouts,
            node.keep_signed,
            shards=devnet_shards_of(node, keys),
        )
        return cls(node, voting)

    def start(self) -> None:
        """Start (or, after a restart, resume from the signer record) voting on the next height."""
        with self.node.lock:
            self._tick()
            self.pending.extend(self.voting.start(int(time.time())))

    def decide_height(self) -> Decision:
        """Carry out effects until the height being decided is decided and stored; the
        effects that follow (the next height's start) wait for the next call."""
        height = self.voting.height
        fired = 0
        while True:
            if not self.pending:
                if fired >= MAX_TIMEOUTS_PER_HEIGHT:
                    raise Stalled(f"height {height}: not decided after {fired} timeouts")
                self._fire_next_timer(height)
                fired += 1
                continue
            effect = self.pending.popleft()
            if isinstance(effect, Decided):
                self.node.store(effect.decision)
                return effect.decision
            self._carry_out(effect)

    # --- internals ----------------------------------------------------------------

    def _carry_out(self, effect: Effect) -> None:
        if isinstance(effect, Send):
            return  # gossip to peers: there are none (see the module docstring)
        if isinstance(effect, SetTimer):
            due = self.clock_ms + effect.milliseconds
            heapq.heappush(self.timers, (due, next(self.sequence), effect))
            return
        with self.node.lock:
            self._tick()
            if isinstance(effect, CheckCandidate):
                self.pending.extend(self._check_candidate(effect.block_hash))
            elif isinstance(effect, BuildBlock) and effect.height == self.voting.height:
                block = self.voting.build_block(effect.validator)
                self.pending.extend(self.voting.on_value(effect.validator, effect.round, block))

    def _tick(self) -> None:
        """Set the voting's and the decided chain's clocks: the voting stamps its votes with
        its clock, and the decided chain checks the blocks built from them against its own."""
        now = int(time.time())
        self.voting.on_tick(now)
        self.node.decided.on_tick(now)

    def _check_candidate(self, block_hash: bytes) -> list[Effect]:
        """Check a candidate the node holds; one it does not hold stays unanswered (no peer has it)."""
        block = self.node.block_by_hash(block_hash)
        if block is None:
            return []
        training: dict[bytes, Block] = {}
        if isinstance(block.body, DecidedBody):
            for verdict in block.body.training:
                named = self.node.block_by_hash(verdict.training_block)
                if named is not None:
                    training[named.hash] = named
        try:
            self.node.check_candidate(block, training)
            valid = True
        except InvalidBlock:
            valid = False
        return self.voting.on_block_checked(block_hash, valid)

    def _fire_next_timer(self, height: int) -> None:
        """Fire the earliest timer of this height (earlier heights' timers are dropped)."""
        while self.timers:
            due, _, timer = heapq.heappop(self.timers)
            if timer.timeout.height < height:
                continue
            self.clock_ms = max(self.clock_ms, due)
            with self.node.lock:
                self._tick()
                self.pending.extend(self.voting.on_timeout(timer.validator, timer.timeout))
            return
        raise Stalled(f"height {height}: nothing left to do and no timer set")


def devnet_shards_of(node: DecidedNode, keys: list[PrivateKey]) -> dict[bytes, Shard]:
    """The INSECURE devnet held-out shards of these devnet validator keys (genesis.devnet_shard)."""
    shards = {key.public_key: devnet_shard(node.genesis, node.genesis_path, key.public_key) for key in keys}
    return {address: shard for address, shard in shards.items() if shard is not None}


def commit_update(node: DecidedNode, miner: Miner, key: PrivateKey, attempts: int) -> tuple[PreparedUpdate | None, int]:
    """Train on the decided head until the update for `key`'s slice on the next decided block
    gains at least the difficulty against the head (at most `attempts` times), then keep its
    signed commitment in the node, where the next block's proposer takes it (p2p/mining.py).
    Returns the update (None if no attempt met the difficulty) and the last attempt's gain."""
    chain, head = node.chain, node.head()
    height = head.block.header.height + 1
    slice_id = compute_next_slice(height, node.genesis.partition.slices)
    seed = compute_training_seed(head.block.hash, key.public_key)
    gain = 0
    for attempt in range(attempts):
        work = miner.work(chain.weights(head.state), slice_id, seed + attempt.to_bytes(4, "big"))
        update = prepare_update(chain, head.block, head.state, key, work.values, work.steps)
        gain = update.expected_gain
        if gain >= head.state.difficulty:
            node.on_commitment(update.commitment)
            return update, gain
    return None, gain


def reveal_committed_update(node: DecidedNode, key: PrivateKey, update: PreparedUpdate) -> Block | None:
    """Reveal `update` on the decided head if the head carries its commitment, and keep the
    training block in the node; None if the head does not carry it or the block's validation
    gain falls short of the difficulty (it would be invalid)."""
    head = node.head()
    if not is_carried(head.block, update):
        return None
    timestamp = max(int(time.time()), head.block.header.timestamp + 1)
    block = reveal_update(node.chain, head.block, head.state, key, update, timestamp)
    if validation_gain(block) < head.state.difficulty:
        return None
    node.on_training_block(block)
    return block


def confirms_update(block: Block) -> bool:
    """A decided block that applies training blocks' updates (those that gain out of sample)."""
    return isinstance(block.body, DecidedBody) and bool(block.body.applied)


def count_confirmed_updates(db: ChainDB) -> int:
    """Decided heights of the stored chain whose block confirmed an update."""
    return sum(1 for block in db.canonical_blocks() if confirms_update(block))
