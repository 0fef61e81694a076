"""A validator that equivocates: it attests every training block on a parent.

Attesting two training blocks on one parent is the act that could finalize
two conflicting blocks, so it is slashable: any node that sees both
attestations builds the evidence, gossips it, and the next validation block
carries it and sets the offender's stake to 0.
"""

from __future__ import annotations

import trio

from chain.blocks import Block
from chain.encoding import pack
from consensus.proposals import attest
from p2p.service import ATTEST_QUIET
from p2p.wire import attestation_topic
from sim.adversaries.base import Adversary


class Equivocator(Adversary):
    kind = "equivocator"

    async def _attest(self, first: Block) -> None:
        state = await self.open_window(first, ATTEST_QUIET)
        if state is None:
            return
        candidates = [b for b in self.node.pending_training_blocks() if b.header.parent == first.header.parent]
        for key in self.config.validator_keys:
            for training in candidates:
                attestation = await trio.to_thread.run_sync(self._locked, attest, self.node.chain, key, state, training)
                await self.publish(attestation_topic(self.chain_id), pack(attestation.fields()))
            if len(candidates) > 1:
                self.record("attested two training blocks on one parent", block=candidates[1].hash.hex(),
                            validator=key.public_key.hex(), invalid=False, expect="slashed")  # fmt: skip
