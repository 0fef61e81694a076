"""A miner that withholds its blocks and releases them late.

It mines honestly but announces each block only WITHHOLD_SECONDS after
making it, hoping to build a private lead. A training block only counts
once validators attest it; by the time this one appears, the round has been
decided on another miner's block, so it is stale, ignored (without a
penalty: lateness is not provably malicious) and the withholder's work is lost.
"""

from __future__ import annotations

import trio

from chain.blocks import Block
from sim.adversaries.base import Adversary

WITHHOLD_SECONDS = 8.0


class Withholder(Adversary):
    kind = "withholder"

    async def announce_mined(self, block: Block) -> None:
        self.record(f"withheld a block for {WITHHOLD_SECONDS:.0f} s", block=block.hash.hex(), invalid=False,
                    expect="stale")  # fmt: skip
        if self._tasks is not None:
            self._tasks.start_soon(self._release, block)

    async def _release(self, block: Block) -> None:
        await trio.sleep(WITHHOLD_SECONDS)
        await self.publish_block(block)
