"""A peer with no stake that attacks the network layer: the hostile-peer tests and bench use it.

`HostilePeer` is a voting node without keys whose sync server and gossip
are the attacker's to script. Each attack is one method (or one setting of
what it serves) and sends exactly what an attacker on the wire could:

- `announce_withheld`: announcements of training blocks on the head whose
  bodies it never serves;
- `announce_invalid`: training blocks that cost a full evaluation to find
  false (the slice perturbed, the claimed loss off by one), served on request;
  `announce_unevaluated` the same without evaluating anything itself (a
  claimed gain with the true loss before: the verifier still evaluates);
- `serve_bomb`: its status claims a far higher head, and its `decided`
  answer is a decode bomb (nested empty arrays);
- `flood_sync`: sync requests as fast as the streams open;
- `publish_raw`: any bytes on a gossip topic (oversized, malformed);
- `send_oversized_frame`: a sync request frame announcing more than the limit.

Each returns or records what it did, so a test can say how many messages it
took the victim to ban it. Fresh identities are cheap: a `HostilePeer` made
with `source` (another hostile peer's node that follows the chain) neither
syncs nor keeps a chain of its own, and forges on the source's head.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from chain.blocks import Block, Header, TrainingBody, body_hash, sign_block
from chain.crypto import PrivateKey
from chain.encoding import pack
from consensus.proposals import propose_training_block
from consensus.rules import compute_assigned_slice, compute_training_seed, compute_validation_seed
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNode, VotingNodeConfig
from p2p.wire import (
    MAX_FRAME_BYTES,
    Announcement,
    Request,
    StatusMessage,
    block_topic,
    encode_varint,
    read_response,
    sync_protocol,
    write_frame,
)
from sim.adversaries.withholder import sign_training_block, unserved_training_block


def decode_bomb(size: int) -> bytes:
    """About `size` bytes of msgpack that decode to ~`size` empty arrays (each one byte on the
    wire, ~60 bytes as a Python list): arrays of 4,096 arrays of empty arrays."""
    inner = b"\xdc\x10\x00" + b"\x90" * 4096  # array16 of 4096 empty arrays
    count = max(1, size // len(inner))
    outer = count.to_bytes(4, "big")
    return b"\xdd" + outer + inner * count  # array32 of `count` such arrays


def forge_costly_block(node: DecidedNode, key: PrivateKey, seed: int) -> Block:
    """A training block on the node's head, correctly signed, whose slice is randomly perturbed
    and whose claimed validation loss after is one better than the truth: finding it false costs
    a verifier a full canonical evaluation of a model nobody has evaluated before."""
    with node.lock:
        head = node.head()
        parent, state, chain = head.block, head.state, node.chain
        slice_id = compute_assigned_slice(parent.header, node.genesis.partition.slices)
        values = chain.layout.extract(chain.weights(state), slice_id).astype(np.int32)
        noise = np.random.default_rng(seed).integers(-3, 4, size=values.shape)
        values = np.clip(values + noise, -32768, 32767).astype(np.int16)
        timestamp = max(parent.header.timestamp + 1, int(time.time()))
        honest = propose_training_block(chain, parent, state, key, values, timestamp, 1)
    assert isinstance(honest.body, TrainingBody)
    body = dataclasses.replace(honest.body, loss_after=honest.body.loss_after - 1)
    header: Header = dataclasses.replace(honest.header, body_hash=body_hash(body))
    return sign_block(key, chain.domain, header, body)


def forge_unevaluated_block(node: DecidedNode, key: PrivateKey, seed: int) -> Block:
    """A training block on the node's head with a randomly perturbed slice, the true loss before
    (the parent's, evaluated once per head and cached) and a claimed gain twice the difficulty:
    the forger evaluates nothing per block, a verifier evaluates the perturbed model."""
    with node.lock:
        head = node.head()
        parent, state, chain = head.block, head.state, node.chain
        slice_id = compute_assigned_slice(parent.header, node.genesis.partition.slices)
        values = chain.layout.extract(chain.weights(state), slice_id).astype(np.int32)
        before = chain.loss(state, "validation", compute_validation_seed(parent.hash, key.public_key))
    noise = np.random.default_rng(seed).integers(-3, 4, size=values.shape)
    content = np.clip(values + noise, -32768, 32767).astype("<i2").tobytes()
    body = TrainingBody(
        slice_id=slice_id,
        weights=content,
        loss_before=before,
        loss_after=before - 2 * max(1, state.difficulty),
        steps=1,
        data_seed=compute_training_seed(parent.hash, key.public_key),
    )
    return sign_training_block(node, key, parent, state.root, body)


class HostilePeer(VotingNode):
    """See the module docstring. Run it like any node (`run`), bootstrapped to its victims."""

    def __init__(
        self, node: DecidedNode, config: VotingNodeConfig, key: PrivateKey, source: DecidedNode | None = None
    ) -> None:
        super().__init__(node, config)
        self.key = key
        """The miner key its forged blocks are signed with."""
        self.source = source or node
        """The node whose decided head it forges on (its own, unless it is a fresh identity)."""
        self.served: dict[bytes, Block] = {}
        """Forged blocks it serves when asked."""
        self.bomb: bytes | None = None
        """What it answers `decided` with (and a far higher head in its status), if set."""
        self.bombs_served = 0

    def _answer(self, request: Request) -> bytes | None:
        if self.bomb is not None and request.method == "status":
            genesis = bytes.fromhex(self.node.genesis.hash)
            fake = os.urandom(32)
            return StatusMessage(genesis, 1_000_000, fake, 1_000_000, fake).encode()
        if self.bomb is not None and request.method == "decided":
            self.bombs_served += 1
            return self.bomb
        if request.method == "block" and request.arguments[0] in self.served:
            return self.served[request.arguments[0]].encode()
        return super()._answer(request)

    async def _sync_loop(self) -> None:
        if self.source is self.node:
            await super()._sync_loop()

    async def _validate_voting_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        if self.source is self.node:
            return await super()._validate_voting_message(forwarder, message)
        return self._is_own(forwarder)  # a fresh identity follows nothing: it spends no work on the chain

    async def _validate_block_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        if self.source is self.node:
            return await super()._validate_block_message(forwarder, message)
        return self._is_own(forwarder)

    def _is_own(self, forwarder: ID) -> bool:
        return self.host is not None and forwarder == self.host.get_id()

    async def announce_withheld(self) -> Block:
        """Announce a training block on our head that we never serve."""
        block = unserved_training_block(self.source, self.key, self.source.decided.head.block)
        await self._publish(block_topic(self.chain_id), Announcement.of(block).encode())
        return block

    async def forge_invalid(self, seed: int) -> Block:
        """A training block on our head that costs a full evaluation to refute (not yet announced)."""
        return await trio.to_thread.run_sync(forge_costly_block, self.source, self.key, seed)

    async def announce_forged(self, block: Block) -> None:
        """Announce a forged block, and serve it when asked."""
        self.served[block.hash] = block
        await self._publish(block_topic(self.chain_id), Announcement.of(block).encode())

    async def announce_invalid(self, seed: int) -> Block:
        """Forge, announce and serve a training block that costs a full evaluation to refute."""
        block = await self.forge_invalid(seed)
        await self.announce_forged(block)
        return block

    async def announce_unevaluated(self, seed: int) -> Block:
        """Announce (and serve) a false training block forged without an evaluation of our own."""
        block = await trio.to_thread.run_sync(forge_unevaluated_block, self.source, self.key, seed)
        await self.announce_forged(block)
        return block

    async def publish_raw(self, topic: str, data: bytes) -> None:
        """Gossip any bytes on a topic."""
        await self._publish(topic, data)

    async def flood_sync(self, peer: ID, count: int, request: Request) -> dict[str, int]:
        """Send `count` requests, eight streams at a time; how they were answered."""
        outcomes = {"ok": 0, "busy": 0, "failed": 0}
        limiter = trio.CapacityLimiter(8)

        async def one() -> None:
            async with limiter:
                try:
                    with trio.fail_after(10):
                        assert self.host is not None
                        stream = await self.host.new_stream(peer, [TProtocol(sync_protocol(self.chain_id))])
                        try:
                            await write_frame(stream, request.encode())
                            _, payload = await read_response(stream)
                        finally:
                            await stream.close()
                    outcomes["busy" if payload.startswith(b"busy") else "ok"] += 1
                except Exception:
                    outcomes["failed"] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
        return outcomes

    async def send_oversized_frame(self, peer: ID) -> bool:
        """A sync request whose frame announces more than MAX_FRAME_BYTES; whether the stream opened."""
        assert self.host is not None
        try:
            with trio.fail_after(10):
                stream = await self.host.new_stream(peer, [TProtocol(sync_protocol(self.chain_id))])
                await stream.write(encode_varint(MAX_FRAME_BYTES + 1) + b"\x00" * 1024)
                await stream.close()
            return True
        except Exception:
            return False


MALFORMED_GOSSIP = (
    b"\xc1",  # not msgpack
    pack([9, []]),  # an unknown voting message type
    b"\x92" + b"\x00" * 70_000,  # over the 64 KiB gossip limit
    pack(["not", "a", "header"]),
    pack([[1, 2, 3], b"\x00" * 64]),
)
"""Gossip payloads no honest node sends."""
