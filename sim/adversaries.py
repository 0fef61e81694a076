"""Adversarial nodes: real libp2p nodes that break the rules on purpose.

Each is a `NetworkNode` with one behaviour changed, so what it sends goes
over the same gossip and sync protocols as an honest node's.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from chain.blocks import Block, Header, TrainingBody, body_hash, sign_block
from chain.crypto import PrivateKey
from consensus.proposals import propose_training_block
from consensus.rules import compute_assigned_slice
from p2p.full_node import FullNode
from p2p.service import NetworkNode, NodeConfig
from p2p.wire import Request

log = logging.getLogger("potchain.adversary")


def forge_training_block(node: NetworkNode, key: PrivateKey, loss_after_offset: int = -1) -> Block:
    """A training block on the node's checkpoint, correctly signed, whose claimed
    validation loss after the update is off by `loss_after_offset` (claiming a
    better loss than the update has, for a negative offset)."""
    parent, state = node.node.checkpoint()
    chain = node.node.chain
    slice_id = compute_assigned_slice(parent.header, key.public_key, node.node.genesis.partition.slices)
    timestamp = max(parent.header.timestamp + 1, int(time.time()))
    with node.node.lock:
        values = chain.layout.extract(chain.weights(state), slice_id)
        honest = propose_training_block(chain, parent, state, key, values, timestamp, 0)
    assert isinstance(honest.body, TrainingBody)
    body = dataclasses.replace(honest.body, loss_after=honest.body.loss_after + loss_after_offset)
    header: Header = dataclasses.replace(honest.header, body_hash=body_hash(body))
    return sign_block(key, chain.domain, header, body)


class InvalidBlockSpammer(NetworkNode):
    """Announces blocks it never imported (they break a rule) and serves them on request."""

    def __init__(self, node: FullNode, config: NodeConfig) -> None:
        super().__init__(node, config)
        self.forged: dict[bytes, Block] = {}
        """Blocks announced, by hash."""

    def _answer(self, request: Request) -> bytes | None:
        block = self.forged.get(request.arguments[0]) if request.method == "block" else None
        return block.encode() if block is not None else super()._answer(request)

    async def spam(self, block: Block) -> None:
        """Gossip an announcement of `block` without importing it."""
        self.forged[block.hash] = block
        log.warning("announcing invalid block %s", block.hash.hex()[:16])
        await self.publish_block(block)


def make_adversary(kind: str, node: FullNode, config: NodeConfig) -> NetworkNode:
    """The NetworkNode subclass for an adversary kind (sim/scenario.py ADVERSARIES)."""
    kinds: dict[str, type[NetworkNode]] = {"invalid-blocks": InvalidBlockSpammer}
    if kind not in kinds:
        raise ValueError(f"unknown adversary {kind!r}; known: {', '.join(sorted(kinds))}")
    return kinds[kind](node, config)
