"""A validator that equivocates: it attests every training block on a parent.

Attesting two training blocks on one parent is the act that could finalize
two conflicting blocks, so it is slashable: any node that sees both
attestations builds the evidence, gossips it, and the next validation block
carries it and sets the offender's stake to 0. It keeps attesting blocks as
they arrive (for EQUIVOCATE_SECONDS), so its stake backs whichever block the
honest validators chose; in the adversarial scenario that is what keeps the
first rounds live, while two of the four validators are adversaries.
"""

from __future__ import annotations

import time

import trio

from chain.blocks import Block
from chain.encoding import pack
from consensus.proposals import attest
from p2p.validator_duties import ATTEST_QUIET
from p2p.wire import attestation_topic
from sim.adversaries.base import Adversary

EQUIVOCATE_SECONDS = 20.0


class Equivocator(Adversary):
    kind = "equivocator"

    async def _attest(self, first: Block) -> None:
        state = await self.open_window(first, ATTEST_QUIET)
        if state is None:
            return
        attested: set[bytes] = set()
        until = time.monotonic() + EQUIVOCATE_SECONDS
        while time.monotonic() < until:
            candidates = [b for b in self.node.pending_training_blocks() if b.header.parent == first.header.parent]
            for training in [b for b in candidates if b.hash not in attested]:
                attested.add(training.hash)
                for key in self.config.validator_keys:
                    attestation = await trio.to_thread.run_sync(
                        self._locked, attest, self.node.chain, key, state, training
                    )
                    await self.publish(attestation_topic(self.chain_id), pack(attestation.fields()))
                    if len(attested) > 1:
                        self.record("attested a second training block on one parent", block=training.hash.hex(),
                                    validator=key.public_key.hex(), invalid=False, expect="slashed")  # fmt: skip
            if not candidates and self.node.checkpoint()[0].hash != first.header.parent:
                return
            await trio.sleep(0.5)
