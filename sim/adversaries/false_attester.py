"""A validator that attests falsely: it claims a test gain its evaluation did not find.

It evaluates the update honestly, then signs an attestation whose test loss
after the update is 1,000 units lower. Every node re-computes the test loss
on the attestation's own seed before it keeps or relays it, so the
attestation is refused and its sender penalized; it never counts toward a
quorum.
"""

from __future__ import annotations

import trio

from chain.blocks import Block, sign_attestation
from chain.encoding import pack
from consensus.proposals import attest
from p2p.validator_duties import ATTEST_QUIET
from p2p.wire import attestation_topic
from sim.adversaries.base import Adversary


class FalseAttester(Adversary):
    kind = "false-attester"

    async def _attest(self, first: Block) -> None:
        state = await self.open_window(first, ATTEST_QUIET)
        if state is None:
            return
        for key in self.config.validator_keys:
            honest = await trio.to_thread.run_sync(self._locked, attest, self.node.chain, key, state, first)
            false = sign_attestation(key, self.node.chain.domain, honest.training_block, honest.parent,
                                     honest.loss_before, honest.loss_after - 1000)  # fmt: skip
            self.record("attested a test loss 1000 below its own evaluation", attestation_of=first.hash.hex(),
                        validator=key.public_key.hex(), invalid=True)  # fmt: skip
            await self.publish(attestation_topic(self.chain_id), pack(false.fields()))
