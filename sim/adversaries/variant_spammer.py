"""A miner that publishes a fresh valid variant of its training block every second.

It mines honestly (the reference miner, on the decided head). Once it has a
training block on the head, it re-signs that block every second with a new
timestamp: each variant is a new, valid block (same update, new hash), which
every node fetches and checks (the losses are memoized by model, so a
variant costs little) and relays. Under the attestation finality such a
stream restarted the validators' wait for a round's last candidate and froze
the chain; with voting rounds, training blocks are only a proposal's inputs:
the proposer names the best it holds when its turn comes, and the height is
decided in round 0 all the same.
"""

from __future__ import annotations

import dataclasses
import time

import trio

from chain.blocks import Block, sign_block
from consensus.rules import InvalidBlock
from sim.adversaries.base import Adversary

VARIANT_SECONDS = 1.0


class VariantSpammer(Adversary):
    kind = "variant-spammer"

    async def run_behaviour(self) -> None:
        head, height, variants, original_hash = b"", 0, list[str](), ""
        while True:
            await trio.sleep(VARIANT_SECONDS)
            parent = self.head_block()
            if parent.hash != head:
                if variants:  # the variants built on the previous head (`height`)
                    self.record(f"published {len(variants)} valid variants of its training block",
                                height=height, original=original_hash, blocks=variants, invalid=False)  # fmt: skip
                head, height, variants = parent.hash, parent.header.height, []
            original = self._own_block(parent)
            if original is None:
                continue
            original_hash = original.hash.hex()
            timestamp = max(int(time.time()), parent.header.timestamp + 1)
            header = dataclasses.replace(original.header, timestamp=timestamp)
            variant = sign_block(self.key, self.node.chain.domain, header, original.body)
            if variant.hash.hex() in variants or variant.hash == original.hash:
                continue
            try:
                await self.publish_training_block(variant)
            except InvalidBlock:
                continue  # decided on meanwhile (stale)
            variants.append(variant.hash.hex())

    def _own_block(self, parent: Block) -> Block | None:
        """Our first training block on `parent` (the miner's, or an earlier variant); read
        without the node's lock (a copy of the kept blocks: see Adversary.head_block)."""
        kept = list(self.node.decided.training.values())
        ours = [b for b in kept if b.header.proposer == self.key.public_key and b.header.parent == parent.hash]
        return min(ours, key=lambda b: b.header.timestamp) if ours else None
