"""A miner that claims a better validation loss than its update has.

On every decided head it announces a training block whose claimed loss after
the update is one unit (2^-16 nats over the batch) below the true one. Every
node re-computes the loss bit for bit before it keeps or relays a training
block, so the block is rejected with the exact numbers, never reaches a
proposer, and its sender loses score until it is banned.
"""

from __future__ import annotations

import trio

from sim.adversaries.base import Adversary, forge_training_block


class FalseClaims(Adversary):
    kind = "false-claims"

    async def run_behaviour(self) -> None:
        last = b""
        while True:
            head = await self.next_head(last)
            last = head.hash
            await trio.sleep(1.0)
            block = await trio.to_thread.run_sync(forge_training_block, self.node, self.key, -1)
            if block.header.parent != self.head_block().hash:
                continue  # decided on meanwhile
            self.record("claimed a validation loss 1 below the truth", block=block.hash.hex(),
                        height=block.header.height, invalid=True)  # fmt: skip
            await self.announce(block)
