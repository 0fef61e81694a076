"""What every adversary shares: a log of its actions, forged blocks it serves or withholds."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import trio

from chain.blocks import Block, Header, TrainingBody, body_hash, sign_block
from chain.crypto import PrivateKey, devnet_key
from consensus.proposals import propose_training_block
from consensus.rules import compute_assigned_slice
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNode, VotingNodeConfig
from p2p.wire import Announcement, Request, block_topic

log = logging.getLogger("potchain.adversary")


class Adversary(VotingNode):
    """A voting node that breaks the rules on purpose and writes down each time it does
    (DATADIR/actions.jsonl), so the simulation can report what the network made of it.
    Its misbehaviour runs in `run_behaviour`, beside the honest node's duties."""

    kind = "adversary"

    def __init__(self, node: DecidedNode, config: VotingNodeConfig) -> None:
        super().__init__(node, config)
        self.forged: dict[bytes, Block] = {}
        """Blocks announced without keeping them, served on request."""
        self.withheld: set[bytes] = set()
        """Blocks announced and never served."""
        self.key: PrivateKey = config.miner_key or devnet_key(f"adversary-{node.datadir.name}")

    def record(self, action: str, **fields: Any) -> None:
        """Append one action to DATADIR/actions.jsonl (the runner reads it)."""
        peer_id = self.peer_id if self.host is not None else None
        entry = {"time": time.time(), "action": action, "peer_id": peer_id, **fields}
        with (self.node.datadir / "actions.jsonl").open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        log.warning("%s: %s %s", self.kind, action, str(fields.get("block", ""))[:16])

    def _answer(self, request: Request) -> bytes | None:
        if request.method == "block":
            block_hash = request.arguments[0]
            if block_hash in self.withheld:
                return None
            forged = self.forged.get(block_hash)
            if forged is not None:
                return forged.encode()
        return super()._answer(request)

    async def announce(self, block: Block, serve: bool = True) -> None:
        """Gossip an announcement of `block` without keeping it; serve it when asked, or never."""
        if serve:
            self.forged[block.hash] = block
        else:
            self.withheld.add(block.hash)
        await self._publish(block_topic(self.chain_id), Announcement.of(block).encode())

    def head_block(self) -> Block:
        """The decided head, read without the node's lock (one attribute read): the trio
        thread must not wait for the lock while a worker thread evaluates under it."""
        return self.node.decided.head.block

    async def next_head(self, last: bytes) -> Block:
        """Wait until the decided head is not `last`; the new head."""
        while True:
            head = self.head_block()
            if head.hash != last:
                return head
            await trio.sleep(0.3)


def forge_training_block(node: DecidedNode, key: PrivateKey, loss_after_offset: int = -1) -> Block:
    """A training block on the node's decided head, correctly signed, that leaves the
    assigned slice as it is and claims a validation loss after the update off by
    `loss_after_offset` (a better loss than it has, for a negative offset). Costs one
    evaluation (the loss before and after are the same model's)."""
    with node.lock:
        head = node.head()
        parent, state, chain = head.block, head.state, node.chain
        slice_id = compute_assigned_slice(parent.header, node.genesis.partition.slices)
        values = chain.layout.extract(chain.weights(state), slice_id)
        timestamp = max(parent.header.timestamp + 1, int(time.time()))
        honest = propose_training_block(chain, parent, state, key, values, timestamp, 0)
    assert isinstance(honest.body, TrainingBody)
    body = dataclasses.replace(honest.body, loss_after=honest.body.loss_after + loss_after_offset)
    header: Header = dataclasses.replace(honest.header, body_hash=body_hash(body))
    return sign_block(key, chain.domain, header, body)
