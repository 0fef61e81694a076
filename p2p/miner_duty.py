"""The miner's duty: train on the checkpoint and propose training blocks.

`MinerDuty` is one part of `NetworkNode` (p2p/service.py), which runs
`_mine_loop` when it has a miner key. `training_text` and `announce_mined`
are the hooks the simulation's adversarial miners override.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from chain.blocks import Block, TrainingBody, ValidationBody
from chain.crypto import PrivateKey
from consensus.proposals import propose_best_training_block
from consensus.rules import compute_assigned_slice, compute_training_seed, is_confirmed
from p2p.full_node import FullNode
from training.data import load_split
from training.miner import Miner

if TYPE_CHECKING:
    from p2p.service import NodeConfig

log = logging.getLogger("potchain.node")


class MinerDuty:
    """`NetworkNode`'s miner duty; see the module docstring."""

    node: FullNode
    config: NodeConfig

    if TYPE_CHECKING:  # the other parts of NetworkNode

        def _locked(self, function: Callable[..., Any], *arguments: Any) -> Any: ...
        async def _wait_change(self, timeout: float) -> None: ...
        async def publish_block(self, block: Block) -> None: ...
        async def import_block(self, block: Block, source: str) -> bool: ...

    def training_text(self, parent: Block, train_text: bytes) -> bytes:
        """The text the miner trains on for a block on `parent`: the training split.
        (The simulation's overfitting miner returns the validation batch instead.)"""
        return train_text

    async def announce_mined(self, block: Block) -> None:
        """Gossip a block this node mined (the simulation's withholding miner delays it)."""
        await self.publish_block(block)

    async def _mine_loop(self, key: PrivateKey) -> None:
        node, genesis = self.node, self.node.genesis
        train_text = await trio.to_thread.run_sync(lambda: load_split(genesis.dataset, node.chunk_directory, "train"))
        miner = Miner(node.weights_of(node.checkpoint()[1]), node.chain.layout, train_text, self.config.training)
        proposed: dict[bytes, Block] = {}
        attempts = 0
        last_parent = b""
        while True:
            parent, state = node.checkpoint()
            if parent.hash != last_parent:
                self._credit_miner(miner, parent, proposed)
                last_parent, attempts = parent.hash, 0
                miner.train_text = self.training_text(parent, train_text)
            if parent.hash in proposed:
                await self._wait_change(1.0)
                continue
            slice_id = compute_assigned_slice(parent.header, key.public_key, genesis.partition.slices)
            seed = compute_training_seed(parent.hash, key.public_key) + attempts.to_bytes(4, "big")
            weights = node.weights_of(state)
            work = await trio.to_thread.run_sync(miner.work, weights, slice_id, seed)
            attempts += 1
            timestamp = max(int(time.time()), parent.header.timestamp + 1)

            block = await trio.to_thread.run_sync(
                self._locked, propose_best_training_block, node.chain, parent, state, key, work.values, timestamp,
                work.steps,
            )  # fmt: skip
            if node.checkpoint()[0].hash != parent.hash:
                continue  # the checkpoint moved while we trained: the work stays in the local model
            assert isinstance(block.body, TrainingBody)
            gain = block.body.loss_before - block.body.loss_after
            if gain < state.difficulty:
                log.info("mined gain %d below difficulty %d: training on", gain, state.difficulty)
                continue
            if await self.import_block(block, "self"):
                proposed[parent.hash] = block
                await self.announce_mined(block)
                log.info("mined training block %d gain %d slice %d", block.header.height, gain, slice_id)

    def _credit_miner(self, miner: Miner, checkpoint: Block, proposed: dict[bytes, Block]) -> None:
        """Tell the miner when the chain confirmed one of its updates (so it keeps its
        local progress on that slice rather than adopting the published values)."""
        body = checkpoint.body
        if isinstance(body, ValidationBody) and is_confirmed(body):
            for block in proposed.values():
                if block.hash == checkpoint.header.parent and isinstance(block.body, TrainingBody):
                    miner.published(block.body.slice_id, np.frombuffer(block.body.weights, dtype="<i2"))
        proposed.clear()
