"""Gossip: block announcements, attestations and evidence.

Each is checked by a topic validator before it is relayed: cheap checks first
(decoding, chain id, signature, height window), then the peer's verification
budget, then the full check. A block is fetched by hash from the peer that
relayed it and imported before we relay it, so invalid blocks stop at the
first honest node, and the penalty lands on the peer that sent it.

`GossipMixin` is one part of `NetworkNode` (p2p/service.py), which subscribes
to the topics and registers these validators in `run()`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from chain.blocks import Attestation, Block, Evidence, Kind, decode_attestation, decode_block
from chain.crypto import MessageType, verify
from chain.encoding import DecodeError, pack, unpack
from consensus.rules import InvalidBlock
from p2p.full_node import FullNode
from p2p.peers import PENALTY_INVALID, PENALTY_MALFORMED, PENALTY_OVER_BUDGET, PeerBook
from p2p.wire import Announcement, ProtocolError, Request, block_topic, evidence_topic

log = logging.getLogger("potchain.node")


class GossipMixin:
    """`NetworkNode`'s gossip: publishing, and the topic validators; see the module docstring."""

    node: FullNode
    chain_id: str
    peers: PeerBook
    host: IHost | None
    pubsub: Pubsub | None
    link_delay: float
    blocked: set[str]

    if TYPE_CHECKING:  # the other parts of NetworkNode

        def _reject(self, peer_id: str, what: str, reason: str, points: int) -> None: ...
        def _notify(self) -> None: ...
        async def import_block(self, block: Block, source: str) -> bool: ...
        async def request(self, peer: ID, request: Request) -> bytes | None: ...
        def _request_sync(self, peer: ID) -> None: ...

    async def _drain(self, subscription: Any) -> None:
        while True:
            await subscription.get()

    def _screen(self, forwarder: ID) -> bool | None:
        """A gossip message's fate before it is read: dropped (a blocked peer's),
        accepted (our own, already checked), or None: check it."""
        if str(forwarder) in self.blocked:
            return False
        if self.host is not None and forwarder == self.host.get_id():
            return True
        return None

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip a message (after the node's added link delay, if any)."""
        assert self.pubsub is not None
        if self.link_delay:
            await trio.sleep(self.link_delay)
        await self.pubsub.publish(topic, data)

    async def publish_block(self, block: Block) -> None:
        await self.publish(block_topic(self.chain_id), Announcement.of(block).encode())

    async def _validate_block_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        if (verdict := self._screen(forwarder)) is not None:
            return verdict
        peer = str(forwarder)
        try:
            announcement = Announcement.decode(message.data)
        except DecodeError as error:
            self._reject(peer, "block announcement", str(error), PENALTY_MALFORMED)
            return False
        block_hash = announcement.block_hash
        if self.node.in_store(block_hash):
            return True
        if announcement.header.height <= self.node.anchor().header.height:
            return False  # stale (a losing racer's block, say): ignored, not punished
        reason = self._check_announcement(announcement)
        if reason is not None:
            self._reject(peer, "block announcement", reason, PENALTY_INVALID)
            return False
        if not self.node.in_store(announcement.header.parent):
            self._request_sync(forwarder)
            return False
        if not self.peers.spend(peer, 2):
            self._reject(peer, "block announcement", "verification budget exhausted", PENALTY_OVER_BUDGET)
            return False
        block = await self._fetch_block(forwarder, block_hash, "announced")
        return block is not None and await self.import_block(block, peer)

    async def _fetch_block(self, forwarder: ID, block_hash: bytes, how: str) -> Block | None:
        """Fetch a block by hash from the peer that gossiped something naming it
        (a peer validates before it relays, so it holds the block)."""
        peer = str(forwarder)
        try:
            data = await self.request(forwarder, Request("block", (block_hash,)))
        except (ProtocolError, trio.TooSlowError, OSError, Exception) as error:
            log.info("fetching block %s from %s failed: %s", block_hash.hex()[:16], peer, error)
            return None
        if data is None:
            self._reject(peer, "block", f"{how} a block it does not serve", PENALTY_MALFORMED)
            return None
        try:
            block = decode_block(data)
        except DecodeError as error:
            self._reject(peer, "block", str(error), PENALTY_MALFORMED)
            return None
        if block.hash != block_hash:
            self._reject(peer, "block", f"served a different block than it {how}", PENALTY_MALFORMED)
            return None
        return block

    def _check_announcement(self, announcement: Announcement) -> str | None:
        """The checks that cost no evaluation: chain, height window, timestamp, signature."""
        header = announcement.header
        if header.chain_id != self.chain_id:
            return f"chain_id {header.chain_id!r}, want {self.chain_id!r}"
        anchor, state = self.node.anchor(), self.node.checkpoint()[1]
        if header.height == anchor.header.height + 1:  # a sibling of our checkpoint: staked before it
            state = self.node.state_of(anchor.hash) or state
        if header.height <= anchor.header.height:
            return f"height {header.height} is at or below the finalized block {anchor.header.height}"
        limit = int(time.time()) + self.node.genesis.consensus.max_future_seconds
        if header.timestamp > limit:
            return f"timestamp {header.timestamp} is in the future (limit {limit})"
        types = {Kind.TRAINING: MessageType.TRAINING_BLOCK, Kind.VALIDATION: MessageType.VALIDATION_BLOCK}
        if header.kind not in types:
            return f"kind {header.kind.name} is not gossiped"
        if not verify(header.proposer, announcement.signature, self.node.chain.domain, types[header.kind], header.hash):
            return "signature: not the proposer's signature of this header"
        if header.kind == Kind.VALIDATION and state.stake_of(header.proposer) <= 0:
            return "proposer: not a validator"
        return None

    async def _validate_attestation_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        if (verdict := self._screen(forwarder)) is not None:
            return verdict
        peer = str(forwarder)
        try:
            attestation = decode_attestation(message.data)
        except DecodeError as error:
            self._reject(peer, "attestation", str(error), PENALTY_MALFORMED)
            return False
        known = self.node.attestations_for(attestation.training_block)
        if attestation in known:
            return True
        unknown = not self.node.in_store(attestation.training_block)
        if unknown and attestation.parent != self.node.checkpoint()[0].hash:
            return False  # stale: neither relayed nor punished
        if not self.peers.spend(peer, 2):
            self._reject(peer, "attestation", "verification budget exhausted", PENALTY_OVER_BUDGET)
            return False
        if unknown and not await self._fetch_attested_block(forwarder, attestation):
            return False
        try:
            evidence = await trio.to_thread.run_sync(self.node.on_attestation, attestation)
        except InvalidBlock as error:
            self._reject(peer, "attestation", str(error), PENALTY_INVALID)
            return False
        if evidence is not None:
            await self._publish_evidence(evidence)
        self._notify()
        return True

    async def _fetch_attested_block(self, forwarder: ID, attestation: Attestation) -> bool:
        """An attestation of a training block we have not seen, on our checkpoint:
        fetch the block from the peer that relayed the attestation, import it and
        gossip it on. A racing miner's block can miss a node (gossip is best
        effort); a validator that never sees the block its peers attest cannot
        follow them, and the round splits."""
        peer = str(forwarder)
        checkpoint, state = self.node.checkpoint()
        if state.stake_of(attestation.validator) <= 0 or not attestation.is_signed_by_validator(self.node.chain.domain):
            self._reject(peer, "attestation", "not signed by a validator", PENALTY_INVALID)
            return False
        block = await self._fetch_block(forwarder, attestation.training_block, "attested")
        if block is None or block.header.parent != checkpoint.hash or not await self.import_block(block, peer):
            return False
        log.info("fetched attested block %s from %s", block.hash.hex()[:16], forwarder)
        await self.publish_block(block)
        return True

    async def _validate_evidence_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        if (verdict := self._screen(forwarder)) is not None:
            return verdict
        peer = str(forwarder)
        try:
            evidence = Evidence.from_fields(unpack(message.data, "evidence", 8192))
        except DecodeError as error:
            self._reject(peer, "evidence", str(error), PENALTY_MALFORMED)
            return False
        try:
            return await trio.to_thread.run_sync(self.node.on_evidence, evidence)
        except InvalidBlock as error:
            self._reject(peer, "evidence", str(error), PENALTY_INVALID)
            return False

    async def _publish_evidence(self, evidence: Evidence) -> None:
        assert self.pubsub is not None
        log.warning("equivocation by validator %s", evidence.first.validator.hex()[:16])
        await self.publish(evidence_topic(self.chain_id), pack(evidence.fields()))
