"""A miner that announces training blocks it never serves.

On every decided head it announces a training block (correctly signed; its
body, never evaluated, claims an arbitrary gain) and answers every request
for it with "not found". A node announces a training block only after
fetching and checking it, so the announcement goes no further than the
withholder's own peers; each of them asks for the block once and charges
the withholder 25 points for not serving it (an honest node serves what it
announced), so it is banned at its fourth; and no proposer can name the
block: a decided block travels with the training blocks it names, and
validators check them.
"""

from __future__ import annotations

import os
import time

import trio

from chain.blocks import Block, Header, Kind, TrainingBody, body_hash, sign_block
from chain.crypto import PrivateKey
from consensus.rules import compute_assigned_slice, compute_training_seed
from p2p.decided_node import DecidedNode
from sim.adversaries.base import Adversary


class Withholder(Adversary):
    kind = "withholder"

    async def run_behaviour(self) -> None:
        last = b""
        while True:
            head = await self.next_head(last)
            last = head.hash
            await trio.sleep(0.5)
            block = self._unserved_block(head)
            self.record("announced a training block it never serves", block=block.hash.hex(),
                        height=block.header.height, invalid=False, expect="not served")  # fmt: skip
            await self.announce(block, serve=False)

    def _unserved_block(self, parent: Block) -> Block:
        return unserved_training_block(self.node, self.key, parent)


def unserved_training_block(node: DecidedNode, key: PrivateKey, parent: Block) -> Block:
    """A correctly signed training block on `parent` whose body (random weights, an arbitrary
    claimed gain) nobody evaluated: announced and never served."""
    slice_id = compute_assigned_slice(parent.header, node.genesis.partition.slices)
    head = node.decided.head  # no lock: see Adversary.head_block
    state = head.state if head.block.hash == parent.hash else None
    body = TrainingBody(
        slice_id=slice_id,
        weights=os.urandom(2 * node.chain.layout.slice_size(slice_id)),
        loss_before=2_000_000_000,
        loss_after=1_000_000_000,
        steps=1,
        data_seed=compute_training_seed(parent.hash, key.public_key),
    )
    return sign_training_block(node, key, parent, state.root if state is not None else bytes(32), body)


def sign_training_block(
    node: DecidedNode, key: PrivateKey, parent: Block, state_root: bytes, body: TrainingBody
) -> Block:
    """`body` as a training block by `key` on `parent`, its header filled in and signed."""
    header = Header(
        chain_id=node.genesis.chain_id,
        height=parent.header.height + 1,
        parent=parent.hash,
        kind=Kind.TRAINING,
        timestamp=max(int(time.time()), parent.header.timestamp + 1),
        proposer=key.public_key,
        state_root=state_root,
        body_hash=body_hash(body),
    )
    return sign_block(key, node.chain.domain, header, body)
