"""A spammer: malformed and oversized gossip, and invalid blocks at a high rate.

Each second it publishes an announcement that does not decode, one far over
the 64 KiB gossip limit, and a correctly signed training block on the wrong
slice. The cheap checks (decoding, size) reject the first two before any
evaluation; the verification budget and the score stop the rest; at -100 the
spammer is disconnected and refused.
"""

from __future__ import annotations

import dataclasses
import os

import trio

from chain.blocks import TrainingBody, body_hash, sign_block
from p2p.wire import block_topic
from sim.adversaries.base import Adversary, forge_training_block


class Spammer(Adversary):
    kind = "spammer"

    async def run_behaviour(self) -> None:
        assert self.pubsub is not None
        topic = block_topic(self.chain_id)
        await trio.sleep(3.0)
        while True:
            await self.pubsub.publish(topic, b"\x93\xc1garbage" + os.urandom(16))
            self.record("published an announcement that does not decode", invalid=True)
            await self.pubsub.publish(topic, os.urandom(200 << 10))
            self.record("published a 200 KiB announcement (limit 64 KiB)", invalid=True)
            forged = forge_training_block(self, self.key, loss_after_offset=0)
            assert isinstance(forged.body, TrainingBody)
            slices = self.node.genesis.partition.slices
            body = dataclasses.replace(forged.body, slice_id=(forged.body.slice_id + 1) % slices)
            header = dataclasses.replace(forged.header, body_hash=body_hash(body))
            block = sign_block(self.key, self.node.chain.domain, header, body)
            self.record("announced a training block on the wrong slice", block=block.hash.hex(), invalid=True)
            await self.announce_forged(block)
            await trio.sleep(1.0)
