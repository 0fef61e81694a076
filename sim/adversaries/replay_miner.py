"""A miner that copies: it replays other miners' training blocks under its own key.

It re-signs each training block it sees with itself as the proposer. The
slice a block may update depends on the proposer's key, so a copy is on the
wrong slice for its new proposer and invalid (three keys in four on the
devnet's four slices); where the slices happen to match, the copy is a valid
block with the same gain, and validators choose between the two by the
lowest hash: the copier can take at most a tie.
"""

from __future__ import annotations

import dataclasses

import trio

from chain.blocks import Kind, sign_block
from consensus.rules import compute_assigned_slice
from sim.adversaries.base import Adversary


class ReplayMiner(Adversary):
    kind = "replay-miner"

    async def run_behaviour(self) -> None:
        copied: set[bytes] = set()
        slices = self.node.genesis.partition.slices
        while True:
            await trio.sleep(0.3)
            for block in self.node.pending_training_blocks():
                if block.hash in copied or block.header.proposer == self.key.public_key:
                    continue
                copied.add(block.hash)
                parent = self.node.block_by_hash(block.header.parent)
                if parent is None or block.header.kind != Kind.TRAINING:
                    continue
                header = dataclasses.replace(block.header, proposer=self.key.public_key)
                copy = sign_block(self.key, self.node.chain.domain, header, block.body)
                valid = compute_assigned_slice(parent.header, self.key.public_key, slices) == getattr(
                    block.body, "slice_id", -1
                )
                self.record("replayed another miner's block under its own key", block=copy.hash.hex(),
                            original=block.hash.hex(), invalid=not valid)  # fmt: skip
                await self.announce_forged(copy)
