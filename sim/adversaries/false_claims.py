"""A miner that claims a better validation loss than its update has.

Every round it announces a training block whose claimed loss after the
update is one unit (2^-16 nats over the batch) below the true one. Every
node re-computes the loss bit for bit, so the block is rejected with the
exact numbers, and its sender loses score until it is banned.
"""

from __future__ import annotations

import trio

from sim.adversaries.base import Adversary, forge_training_block, next_checkpoint


class FalseClaims(Adversary):
    kind = "false-claims"

    async def run_behaviour(self) -> None:
        last = b""
        while True:
            checkpoint = await next_checkpoint(self, last)
            last = checkpoint.hash
            await trio.sleep(1.0)
            block = forge_training_block(self, self.key, loss_after_offset=-1)
            self.record("claimed a validation loss 1 below the truth", block=block.hash.hex(), invalid=True)
            await self.announce_forged(block)
