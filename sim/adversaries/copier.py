"""Miners that copy other miners' revealed updates under their own keys.

A copier holds one key (every training block on a parent sets the slice the
parent assigns, whoever mines it). When another miner's committed training
block on our head arrives (the first one at each height) it

1. signs the same weights under its key, evaluates the copy and publishes it
   (uncommitted: its update was public only from the original's reveal on),
   and
2. when the next block assigns the same slice (a genesis of one slice; with
   more, the next height assigns the next slice and a copy cannot be carried
   over), commits the copy for the next height
   (`sign_update_commitment(height = head + 1)`) and reveals it on that block
   if the block carries the commitment.

The perturbing copier adds a small random perturbation first (a few percent
of the weights moved by 1 to 3), so that its copy is not the same update.

What the rules do with it (docs/spec.md, section 17.4): at the original's
height the copy is uncommitted, ranks below the committed original and earns
nothing; a height later it is judged against a state that already holds the
original if that was applied. The runner reports `copier_rewards`: every
reward paid to a copier key (target 0).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import trio

from chain.blocks import Block, TrainingBody, compute_update_hash, sign_update_commitment
from chain.crypto import PrivateKey, devnet_key
from consensus.decisions import get_committed_updates, is_committed
from consensus.proposals import propose_training_block
from consensus.rules import InvalidBlock, StaleBlock, UnknownParent, compute_next_slice
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNodeConfig
from sim.adversaries.base import Adversary
from sim.adversaries.committing import HEAD_POLL_SECONDS
from training.weights import WEIGHT_MAX

MAX_COPIES_PER_HEIGHT = 1
"""Committed originals copied per height: a copy is worth making of an update the head
carries a commitment to (the one a proposer tests and pays); every copy costs each node
two evaluations to check, and the scenario's small machine many more."""
PERTURBED_FRACTION = 0.03
"""The share of a copied slice's weights the perturbing copier moves."""
MAX_PERTURBATION = 3
"""It moves each of them by 1 to this many units, up or down."""


def copier_key(node_name: str) -> PrivateKey:
    """devnet_key(f"copier-{node_name}"): the copier's one key."""
    return devnet_key(f"copier-{node_name}")


def perturb(values: np.ndarray, seed: bytes) -> np.ndarray:
    """`values` with PERTURBED_FRACTION of them (at least one) moved by 1..MAX_PERTURBATION up or down."""
    generator = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))
    count = max(1, int(values.size * PERTURBED_FRACTION))
    positions = generator.choice(values.size, size=count, replace=False)
    steps = generator.integers(1, MAX_PERTURBATION + 1, size=count) * generator.choice([-1, 1], size=count)
    moved = values.astype(np.int64)
    moved[positions] = np.clip(moved[positions] + steps, -WEIGHT_MAX, WEIGHT_MAX)
    return moved.astype(np.int16)


class Copier(Adversary):
    kind = "copier"
    perturbs = False
    """Whether copies are perturbed (the perturbing copier)."""

    def __init__(self, node: DecidedNode, config: VotingNodeConfig) -> None:
        super().__init__(node, config)
        self.key = copier_key(node.datadir.name)

    async def run_behaviour(self) -> None:
        ours = self.key.public_key
        copied: set[bytes] = set()  # the updates (sha256 of slice and weights) copied or made on the head:
        # a perturbing copier does not copy its own perturbations back from another copier
        pending: tuple[np.ndarray, str, int] | None = None  # the committed copy: values, original, height
        head_hash = b""
        made = 0  # copies made on the head
        while True:
            await trio.sleep(HEAD_POLL_SECONDS)
            head = self.head_block()
            if head.hash != head_hash:
                head_hash, copied, made = head.hash, set(), 0
                if pending is not None and pending[2] == head.header.height:
                    await self._reveal(head, pending[0], pending[1])
                pending = None
            originals = [
                block for block in list(self.node.decided.training.values())
                if block.header.parent == head.hash and block.header.proposer != ours
                and is_committed(head, block)
            ]  # fmt: skip
            for original in originals:
                if made >= MAX_COPIES_PER_HEIGHT:
                    break
                body = original.body
                assert isinstance(body, TrainingBody)
                update = hashlib.sha256(body.slice_id.to_bytes(4, "big") + body.weights).digest()
                if update in copied:
                    continue
                copied.add(update)
                made += 1
                values = np.frombuffer(body.weights, dtype="<i2").astype(np.int16)
                if self.perturbs:
                    values = perturb(values, original.hash)
                    copied.add(
                        hashlib.sha256(body.slice_id.to_bytes(4, "big") + values.astype("<i2").tobytes()).digest()
                    )
                await self._copy(head, original, values)
                carried_over = compute_next_slice(head.header.height + 1, self.node.genesis.partition.slices)
                if carried_over == body.slice_id and pending is None and await self._commit(head, original, values):
                    pending = (values, original.hash.hex(), head.header.height + 1)

    async def _copy(self, parent: Block, original: Block, values: np.ndarray) -> None:
        """Publish `values` on `parent` under our key (uncommitted)."""
        assert isinstance(original.body, TrainingBody)
        copy, difficulty = await trio.to_thread.run_sync(self._propose, parent, self.key, values, original.body.steps)
        if copy is None:
            return
        await self._publish_copy(parent, copy, difficulty, original.hash.hex(), "copied a training block")

    async def _commit(self, head: Block, original: Block, values: np.ndarray) -> bool:
        """Commit the copy for the next height (carried by its decided block, revealed on it)."""
        assert isinstance(original.body, TrainingBody)
        height, key = head.header.height + 1, self.key
        update_hash = compute_update_hash(key.public_key, original.body.slice_id, values.astype("<i2").tobytes())
        commitment = sign_update_commitment(key, self.node.chain.domain, height, update_hash)
        try:
            await self.publish_commitment(commitment)
        except (StaleBlock, UnknownParent):
            return False
        self.record("committed to a copy", height=height, original=original.hash.hex(), miner=key.public_key.hex(),
                    perturbed=self.perturbs, update=True, invalid=False)  # fmt: skip
        return True

    async def _reveal(self, parent: Block, values: np.ndarray, original: str) -> None:
        """Reveal a committed copy on `parent`, if `parent` carries the commitment."""
        key = self.key
        slice_id = compute_next_slice(parent.header.height, self.node.genesis.partition.slices)
        update_hash = compute_update_hash(key.public_key, slice_id, values.astype("<i2").tobytes())
        if get_committed_updates(parent).get(key.public_key) != update_hash:
            self.record("commitment to a copy not carried by the decided block", height=parent.header.height,
                        original=original, miner=key.public_key.hex(), update=True, invalid=False)  # fmt: skip
            return
        copy, difficulty = await trio.to_thread.run_sync(self._propose, parent, key, values, 0)
        if copy is not None:
            await self._publish_copy(parent, copy, difficulty, original, "revealed a committed copy")

    async def _publish_copy(self, parent: Block, copy: Block, difficulty: int, original: str, what: str) -> None:
        assert isinstance(copy.body, TrainingBody)
        gain = copy.body.loss_before - copy.body.loss_after
        fields = {"original": original, "height": copy.header.height, "miner": copy.header.proposer.hex(),
                  "validation_gain": gain, "committed": is_committed(parent, copy), "perturbed": self.perturbs,
                  "update": True, "invalid": False}  # fmt: skip
        if gain < difficulty:
            self.record(f"{what}: below the difficulty, not published", difficulty=difficulty, **fields)
            return
        try:
            await self.publish_training_block(copy)
        except InvalidBlock as error:  # decided on meanwhile (stale), or the rules refuse it
            self.record(f"{what}: refused ({error})", block=copy.hash.hex(), **fields)
            return
        self.record(what, block=copy.hash.hex(), **fields)

    def _propose(self, parent: Block, key: PrivateKey, values: np.ndarray, steps: int) -> tuple[Block | None, int]:
        """The copy as `key`'s training block on `parent` and the difficulty it must meet (None: the head moved)."""
        with self.node.lock:
            head = self.node.head()
            if head.block.hash != parent.hash:
                return None, 0
            timestamp = max(int(time.time()), parent.header.timestamp + 1)
            block = propose_training_block(self.node.chain, parent, head.state, key, values, timestamp, steps)
            return block, head.state.difficulty


class PerturbingCopier(Copier):
    kind = "perturbing-copier"
    perturbs = True
