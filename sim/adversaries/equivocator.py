"""A validator that equivocates: two prevotes and two precommits in every round, two proposals in its own.

It runs the honest voting machine (its signer record keeps the honest
messages consistent), and for each prevote or precommit the machine signs it
signs and gossips a twin for another value: nil for a block, and for nil
the block of its own second proposal, or a hash of no block. When it is the
round's proposer it proposes two different blocks: the honest one and a
second, valid when the honest one names a training block (the same height
without it), else invalid (a timestamp the rules do not give it). Both go
out on the votes topic in a random order, so honest nodes may see either
first.

Every honest node that receives both messages keeps the pair as evidence;
the next honest proposer puts it in its decided block, which sets the
offender's stake to 0. Its stake is below a third, so the two conflicting
votes cannot decide two blocks; after the slashing its key no longer votes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import trio

from chain.blocks import Block, DecidedBody, sign_block
from chain.votes import Proposal, Vote, sign_proposal, sign_vote
from consensus.decisions import propose_decided_block
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNodeConfig, decode_voting_message, encode_voting_message, votes_topic
from sim.adversaries.base import Adversary


class Equivocator(Adversary):
    kind = "equivocator"

    def __init__(self, node: DecidedNode, config: VotingNodeConfig) -> None:
        super().__init__(node, config)
        self.keys = {key.public_key: key for key in self.config.validator_keys}
        self.twins: dict[Proposal | Vote, Proposal | Vote] = {}
        """Each honest message we signed, and the conflicting one we signed beside it."""
        self.second_blocks: dict[tuple[int, int], Block] = {}
        """Our second proposal's block by (height, round)."""

    async def _publish(self, topic: str, data: bytes) -> None:
        if topic != votes_topic(self.chain_id):
            await super()._publish(topic, data)
            return
        try:
            message = decode_voting_message(data)
        except Exception:
            await super()._publish(topic, data)
            return
        twin = await self._twin(message) if isinstance(message, Proposal | Vote) else None
        if twin is None:
            await super()._publish(topic, data)
            return
        order = [data, encode_voting_message(twin)]
        random.Random(f"{message.height}/{message.round}/{type(message).__name__}").shuffle(order)
        for item in order:
            await super()._publish(topic, item)

    async def _twin(self, message: Proposal | Vote) -> Proposal | Vote | None:
        """The conflicting message for one of our keys' messages (made once, re-sent with it)."""
        if message in self.twins:
            return self.twins[message]
        signer = message.proposer if isinstance(message, Proposal) else message.validator
        key = self.keys.get(signer)
        if key is None:
            return None
        domain = self.node.chain.domain
        twin: Proposal | Vote
        if isinstance(message, Proposal):
            second = await trio.to_thread.run_sync(self._second_block, message)
            if second is None:
                return None
            self.forged[second.hash] = second
            self.second_blocks[(message.height, message.round)] = second
            unsigned = dataclasses.replace(message, block_hash=second.hash, valid_round=-1, signature=b"")
            twin = sign_proposal(key, domain, unsigned)
            what = "proposed two different blocks in one round"
        else:
            if message.block_hash is not None:
                other = None
            else:
                second = self.second_blocks.get((message.height, message.round))
                other = second.hash if second is not None else hashlib.sha256(
                    f"potchain/equivocator/{message.height}/{message.round}".encode()
                ).digest()  # fmt: skip
            twin = sign_vote(key, domain, dataclasses.replace(message, block_hash=other, signature=b""))
            what = f"signed two {message.kind.name.lower()}s in one round"
        self.twins[message] = twin
        first_hash = message.block_hash.hex() if message.block_hash is not None else None
        second_hash = twin.block_hash.hex() if twin.block_hash is not None else None
        self.record(what, validator=signer.hex(), kind=_kind(message), height=message.height, round=message.round,
                    first=first_hash, second=second_hash, invalid=False, expect="slashed")  # fmt: skip
        return twin

    def _second_block(self, proposal: Proposal) -> Block | None:
        """Another block for the proposal's height, cheap to make (it delays the real proposal):
        the same height without its training block (valid), else the real block with a
        timestamp the rules do not give it (invalid)."""
        node = self.node
        key = self.keys[proposal.proposer]
        with node.lock:
            head = node.head()
            real = node.block_by_hash(proposal.block_hash)
            if real is None or head.block.header.height + 1 != proposal.height:
                return None
            if isinstance(real.body, DecidedBody) and real.body.training:
                return propose_decided_block(
                    node.chain, head.block, head.state, key, [], head.commit, node.decided.head_validators,
                    real.body.evidence,
                )  # fmt: skip
            header = dataclasses.replace(real.header, timestamp=real.header.timestamp + 1)
            return sign_block(key, node.chain.domain, header, real.body)


def _kind(message: Proposal | Vote) -> str:
    return "proposal" if isinstance(message, Proposal) else message.kind.name.lower()
