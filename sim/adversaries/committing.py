"""A miner that commits to its update while a height is decided, then reveals it on that height's block.

What the overfitter, the public-data miner and the colluder share; they
differ only in the text they train on (`training_text`). The pipeline, one
step per decided head `h` (docs/spec.md, section 17.2):

1. commit: the update trained during the previous height, for the slice
   block `h + 1` will assign (`compute_next_slice(h + 1)`), is
   signed into an `UpdateCommitment` for height `h + 1` and gossiped at
   once (the proposer of `h + 1` carries the commitments it holds when it
   builds its block);
2. reveal: the update committed for height `h`, if block `h` carries the
   commitment, becomes a training block on block `h` (its validation batch,
   seeded by block `h` and the miner, did not exist when the update was
   fixed: a committed update must meet the difficulty on a batch it could
   not fit); a commitment block `h` does not carry is not revealed;
3. train: the update for height `h + 2` (its slice is known now), on the
   state of block `h`.

Each commitment, reveal and missed commitment is written to actions.jsonl
with `update: true`; the runner reports what the decided chain made of it
(named, applied, paid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import trio

from chain.blocks import Block, DecidedBody, TrainingBody, compute_update_hash, sign_update_commitment
from consensus.decisions import get_committed_updates, is_committed
from consensus.proposals import propose_training_block
from consensus.rules import InvalidBlock, StaleBlock, UnknownParent, compute_next_slice, compute_training_seed
from sim.adversaries.base import Adversary
from training.miner import Miner

HEAD_POLL_SECONDS = 0.05
"""How often the loop looks for a new decided head: a commitment must reach the next
proposer before it builds its block (as soon as it holds a training block on the head)."""


async def next_decided_head(adversary: Adversary, last: bytes) -> Block:
    """Wait until the decided head is not `last` (looking every HEAD_POLL_SECONDS); the new head."""
    while True:
        head = adversary.head_block()
        if head.hash != last:
            return head
        await trio.sleep(HEAD_POLL_SECONDS)


@dataclass(frozen=True)
class PreparedUpdate:
    """An update trained for one height's reveal."""

    height: int
    """The height of the decided block that carries its commitment and that it is revealed on."""
    slice_id: int
    """The slice that block assigns (`compute_next_slice(height)`)."""
    values: np.ndarray
    """The slice's new int16 values."""
    steps: int
    """Optimizer steps it took."""

    @property
    def weights(self) -> bytes:
        return self.values.astype("<i2").tobytes()


class CommittingMiner(Adversary):
    """See the module docstring; a subclass gives `training_text` (and may refresh it per head)."""

    kind = "committing-miner"

    def training_text(self) -> bytes:
        """The text the miner trains on (read once, in a worker thread)."""
        raise NotImplementedError(f"{type(self).__name__}: training_text is not given")

    def refreshed_text(self, head: Block) -> bytes | None:
        """New text to train on once `head` is decided (None: the same as before)."""
        return None

    async def run_behaviour(self) -> None:
        node = self.node
        text = await trio.to_thread.run_sync(self.training_text)
        miner = Miner(node.chain.weights(node.head().state), node.chain.layout, text, self.config.training)
        committed: dict[int, PreparedUpdate] = {}
        prepared: PreparedUpdate | None = None
        revealed: dict[bytes, PreparedUpdate] = {}
        last = b""
        while True:
            head = await next_decided_head(self, last)
            last, height = head.hash, head.header.height
            if prepared is not None and prepared.height == height + 1 and await self._commit(prepared):
                committed[prepared.height] = prepared
            for applied in head.body.applied if isinstance(head.body, DecidedBody) else ():
                if applied in revealed:  # the chain took our update: the local model keeps its own progress
                    ours = revealed[applied]
                    miner.published(ours.slice_id, ours.values)
            update = committed.pop(height, None)
            if update is not None:
                block = await self._reveal(head, update)
                if block is not None:
                    revealed = {block.hash: update}
            committed = {h: u for h, u in committed.items() if h > height}
            fresh = await trio.to_thread.run_sync(self.refreshed_text, head)
            if fresh is not None:
                miner.train_text = fresh
            decision = node.head()
            if decision.block.hash != head.hash:
                continue  # decided on meanwhile: train for the newer head
            target = height + 2
            slice_id = compute_next_slice(target, node.genesis.partition.slices)
            seed = compute_training_seed(head.hash, self.key.public_key)
            work = await trio.to_thread.run_sync(miner.work, node.chain.weights(decision.state), slice_id, seed)
            prepared = PreparedUpdate(target, slice_id, work.values, work.steps)

    async def _commit(self, update: PreparedUpdate) -> bool:
        """Sign and gossip the commitment to `update`; whether it was kept for its height."""
        update_hash = compute_update_hash(self.key.public_key, update.slice_id, update.weights)
        commitment = sign_update_commitment(self.key, self.node.chain.domain, update.height, update_hash)
        try:
            await self.publish_commitment(commitment)
        except (StaleBlock, UnknownParent):
            return False  # the height was decided meanwhile
        self.record("committed to an update", height=update.height, slice=update.slice_id,
                    update_hash=update_hash.hex(), miner=self.key.public_key.hex(), update=True,
                    invalid=False)  # fmt: skip
        return True

    async def _reveal(self, parent: Block, update: PreparedUpdate) -> Block | None:
        """The committed update as a training block on `parent` (block `update.height`), if
        `parent` carries its commitment and the update meets the difficulty; published."""
        update_hash = compute_update_hash(self.key.public_key, update.slice_id, update.weights)
        if get_committed_updates(parent).get(self.key.public_key) != update_hash:
            self.record("commitment not carried by the decided block", height=update.height,
                        update_hash=update_hash.hex(), miner=self.key.public_key.hex(), update=True,
                    invalid=False)  # fmt: skip
            return None
        block, difficulty = await trio.to_thread.run_sync(self._propose, parent, update)
        if block is None:
            return None
        assert isinstance(block.body, TrainingBody)
        gain = block.body.loss_before - block.body.loss_after
        fields = {"height": block.header.height, "slice": update.slice_id, "validation_gain": gain,
                  "committed": is_committed(parent, block), "miner": self.key.public_key.hex(), "update": True,
                  "invalid": False}  # fmt: skip
        if gain < difficulty:
            self.record("committed update below the difficulty: not revealed", difficulty=difficulty, **fields)
            return None
        try:
            await self.publish_training_block(block)
        except InvalidBlock as error:  # decided on meanwhile (stale), or the rules refuse it
            self.record(f"reveal refused: {error}", block=block.hash.hex(), **fields)
            return None
        self.record("revealed its committed update", block=block.hash.hex(), **fields)
        return block

    def _propose(self, parent: Block, update: PreparedUpdate) -> tuple[Block | None, int]:
        """The training block revealing `update` on `parent`, and the difficulty it must meet
        (None when the head moved past `parent`)."""
        with self.node.lock:
            head = self.node.head()
            if head.block.hash != parent.hash:
                return None, 0
            timestamp = max(int(time.time()), parent.header.timestamp + 1)
            block = propose_training_block(self.node.chain, parent, head.state, self.key, update.values, timestamp,
                                           update.steps)  # fmt: skip
            return block, head.state.difficulty
