"""What every adversary shares: a log of its actions, and forging blocks."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import trio

from chain.blocks import Block, Header, TrainingBody, body_hash, sign_block
from chain.crypto import PrivateKey, devnet_key
from chain.state import State
from consensus.proposals import propose_training_block
from consensus.rules import compute_assigned_slice
from p2p.full_node import FullNode
from p2p.service import NetworkNode, NodeConfig
from p2p.wire import Request

log = logging.getLogger("potchain.adversary")


class Adversary(NetworkNode):
    """A node that breaks the rules on purpose and writes down each time it does
    (DATADIR/actions.jsonl), so the simulation can report what the network made of it."""

    kind = "adversary"

    def __init__(self, node: FullNode, config: NodeConfig) -> None:
        super().__init__(node, config)
        self.forged: dict[bytes, Block] = {}
        """Blocks announced without importing them, served on request."""
        self.key: PrivateKey = config.miner_key or devnet_key(f"adversary-{config.datadir.name}")

    def record(self, action: str, **fields: Any) -> None:
        entry = {"time": time.time(), "action": action, "peer_id": self.peer_id, **fields}
        with (self.config.datadir / "actions.jsonl").open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        log.warning("%s: %s %s", self.kind, action, fields.get("block", "")[:16])

    def _answer(self, request: Request) -> bytes | None:
        block = self.forged.get(request.arguments[0]) if request.method == "block" else None
        return block.encode() if block is not None else super()._answer(request)

    async def open_window(self, first: Block, seconds: float) -> State | None:
        """For a validator adversary: once per parent, wait `seconds` after its first
        training block; the parent's state, or None when this parent was handled."""
        parent_hash = first.header.parent
        if parent_hash in self._attest_windows:
            return None
        self._attest_windows.add(parent_hash)
        await trio.sleep(seconds)
        return self.node.state_of(parent_hash)

    async def announce_forged(self, block: Block) -> None:
        """Gossip an announcement of `block` without importing it (and serve it when asked)."""
        self.forged[block.hash] = block
        await self.publish_block(block)


def forge_training_block(node: NetworkNode, key: PrivateKey, loss_after_offset: int = -1) -> Block:
    """A training block on the node's checkpoint, correctly signed, that leaves the
    assigned slice as it is and claims a validation loss after the update off by
    `loss_after_offset` (a better loss than it has, for a negative offset)."""
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


async def next_checkpoint(node: NetworkNode, last: bytes) -> Block:
    """Wait until the node's checkpoint is not `last`."""
    while True:
        checkpoint = node.node.checkpoint()[0]
        if checkpoint.hash != last:
            return checkpoint
        await trio.sleep(0.3)
