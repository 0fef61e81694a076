"""The networked full node: one trio loop for libp2p, the chain and the duties.

`NetworkNode.run()` starts the libp2p host, joins the gossip topics, serves
the sync protocol, dials its bootstrap peers, and runs these tasks until it
is cancelled (SIGINT or SIGTERM):

- **gossip**: block announcements, attestations and evidence, each checked
  by a topic validator before it is relayed: cheap checks first (decoding,
  chain id, signature, height window), then the peer's verification budget,
  then the full check. A block is fetched by hash from the peer that relayed
  it and imported before we relay it, so invalid blocks stop at the first
  honest node, and the penalty lands on the peer that sent it.
- **sync**: every two seconds, ask each peer for its status; when a peer's
  head is as high as ours and unknown to us, fetch its canonical blocks from
  our finalized block up and import each one (a chain that does not descend
  from it is refused: no reorg crosses a finalized block).
- **duties**: a validator attests the first valid training block on the
  checkpoint and proposes the validation block in its turn; a miner trains
  and proposes training blocks.

Every evaluation (imports, attestations, training) runs in a worker thread,
never on the event loop; the node's state is behind `FullNode.lock`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from chain.blocks import (
    Attestation,
    Block,
    Evidence,
    Kind,
    TrainingBody,
    ValidationBody,
    decode_attestation,
    decode_block,
)
from chain.crypto import MessageType, PrivateKey, verify
from chain.encoding import DecodeError, pack, unpack
from consensus.proposals import (
    attest,
    get_quorum_stake,
    get_validation_proposers,
    propose_best_training_block,
    propose_validation_block,
)
from consensus.rules import (
    InvalidBlock,
    StaleBlock,
    UnknownParent,
    compute_assigned_slice,
    compute_training_seed,
    is_confirmed,
)
from p2p.full_node import FullNode, ImportResult
from p2p.host import load_or_create_node_key, make_host, make_pubsub
from p2p.peers import PENALTY_INVALID, PENALTY_MALFORMED, PENALTY_OVER_BUDGET, PeerBook
from p2p.votes import VoteRecord
from p2p.wire import (
    ERROR,
    MAX_BLOCKS_PER_REQUEST,
    NOT_FOUND,
    OK,
    Announcement,
    ProtocolError,
    Request,
    StatusMessage,
    attestation_topic,
    block_topic,
    decode_block_list,
    decode_request,
    evidence_topic,
    read_frame,
    read_response,
    sync_protocol,
    write_frame,
    write_response,
)
from training.data import load_split
from training.miner import Miner, TrainingConfig

log = logging.getLogger("potchain.node")

REQUEST_TIMEOUT = 20.0
"""Seconds a sync request may take before the peer is given up on."""
SYNC_INTERVAL = 2.0
PROPOSER_BACKOFF = 3.0
"""Seconds each validator after the first in the rotation waits for the ones before it."""
ATTEST_QUIET = 1.5
"""Seconds without a new training block on a parent before a validator chooses one to attest."""
ATTEST_WINDOW = 6.0
"""The longest a validator waits for the leader after the first training block on a parent."""
QUORUM_GRACE = 0.5
"""Seconds the proposer waits after a quorum for the remaining attestations."""


@dataclass
class NodeConfig:
    """How to run one networked node."""

    datadir: Path
    """Where the chain database, the node key and the RPC token live."""
    listen: str = "/ip4/127.0.0.1/tcp/0"
    """libp2p listen multiaddr."""
    bootstrap: list[str] = field(default_factory=list)
    """Peers to dial at start (full multiaddrs with /p2p/ id), re-dialed while disconnected."""
    validator_keys: list[PrivateKey] = field(default_factory=list)
    """Validator keys to attest and propose with."""
    miner_key: PrivateKey | None = None
    """Mine with this key (None: do not mine)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The miner's training configuration."""
    rpc_host: str = "127.0.0.1"
    rpc_port: int | None = 0
    """RPC port (0: any free port; None: no RPC server)."""


@dataclass
class Rejection:
    """An invalid message this node refused, for logs, the RPC and tests."""

    time: float
    peer_id: str
    what: str
    reason: str


def compute_claimed_gain(block: Block) -> int:
    """A training block's validation gain (its claim, checked on import)."""
    body = block.body
    return body.loss_before - body.loss_after if isinstance(body, TrainingBody) else 0


def rank_candidate(block: Block) -> tuple[int, bytes]:
    """How validators order competing training blocks: largest validation gain, then lowest hash."""
    return (-compute_claimed_gain(block), block.hash)


class NetworkNode:
    """A full node on the network; see the module docstring."""

    def __init__(self, node: FullNode, config: NodeConfig) -> None:
        self.node = node
        self.config = config
        self.chain_id = node.genesis.chain_id
        self.peers = PeerBook()
        self.rejections: list[Rejection] = []
        self.ready = False
        self.syncing = False
        self.host: IHost | None = None
        self.pubsub: Pubsub | None = None
        self.listen_addresses: list[str] = []
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()
        self.votes = VoteRecord.open(config.datadir / "votes")
        """What our validators attested, on disk: a restart never makes them attest twice on one parent."""
        self._attest_windows: set[bytes] = set()
        """Parents whose attestation window has opened (`_attest` runs once per parent)."""
        self._quorum_since: dict[bytes, float] = {}
        self._proposed: set[bytes] = set()
        self._syncing_from: set[str] = set()
        self._stop: trio.CancelScope | None = None
        self._sync_tasks: trio.Nursery | None = None
        self._tasks: trio.Nursery | None = None
        self.link_delay = 0.0
        """Seconds added before everything this node sends (set over the RPC to slow a test node's links)."""
        self.blocked: set[str] = set()
        """Peer ids this node refuses (set over the RPC to partition a test network)."""

    # --- lifecycle ------------------------------------------------------------------

    async def run(self, on_started: Callable[[NetworkNode], Awaitable[None] | None] | None = None) -> None:
        """Run until cancelled or `stop()`; the node's database stays open (the caller closes it)."""
        key_pair = load_or_create_node_key(self.config.datadir / "node_key")
        host = make_host(key_pair)
        pubsub, router = make_pubsub(host)
        self.host, self.pubsub = host, pubsub
        self.trio_token = trio.lowlevel.current_trio_token()
        listen = [multiaddr.Multiaddr(self.config.listen)]
        async with trio.open_nursery() as outer:  # opened before host.run, as py-libp2p needs
            async with host.run(listen_addrs=listen), background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                host.set_stream_handler(TProtocol(sync_protocol(self.chain_id)), self._serve_sync)
                self.listen_addresses = [str(address) for address in host.get_addrs()]
                topics: list[tuple[str, Callable[[ID, rpc_pb2.Message], Awaitable[bool]]]] = [
                    (block_topic(self.chain_id), self._validate_block_message),
                    (attestation_topic(self.chain_id), self._validate_attestation_message),
                    (evidence_topic(self.chain_id), self._validate_evidence_message),
                ]
                async with trio.open_nursery() as tasks:
                    self._stop, self._tasks = tasks.cancel_scope, tasks
                    for topic, validator in topics:
                        pubsub.set_topic_validator(topic, validator, True)
                        subscription = await pubsub.subscribe(topic)
                        tasks.start_soon(self._drain, subscription)
                    tasks.start_soon(self._supervise, self._watch_peers)
                    tasks.start_soon(self._supervise, self._sync_loop)
                    if self.config.validator_keys:
                        tasks.start_soon(self._supervise, self._propose_loop)
                    if self.config.miner_key is not None:
                        tasks.start_soon(self._supervise, self._mine_loop, self.config.miner_key)
                    tasks.start_soon(self._supervise, self.run_behaviour)
                    log.info("listening on %s", " ".join(self.listen_addresses))
                    if on_started is not None:
                        result = on_started(self)
                        if result is not None:
                            await result
                log.info("stopping")
            outer.cancel_scope.cancel()
        pubsub.seen_messages.stop()

    async def run_behaviour(self) -> None:
        """A subclass's own behaviour, run beside the node's duties (the simulation's
        adversaries, sim/adversaries/); an honest node has none."""

    def training_text(self, parent: Block, train_text: bytes) -> bytes:
        """The text the miner trains on for a block on `parent`: the training split.
        (The simulation's overfitting miner returns the validation batch instead.)"""
        return train_text

    async def announce_mined(self, block: Block) -> None:
        """Gossip a block this node mined (the simulation's withholding miner delays it)."""
        await self.publish_block(block)

    async def _supervise(self, task: Callable[..., Awaitable[None]], *arguments: Any) -> None:
        """Run a task; if it fails unexpectedly, log the error and restart it a second later.
        A bug in one duty must not take the node down."""
        while True:
            try:
                await task(*arguments)
                return
            except Exception:
                log.exception("task %s failed; restarting it", task.__name__)
                await trio.sleep(1.0)

    def stop(self) -> None:
        """Cancel the node's tasks (from the trio thread)."""
        if self._stop is not None:
            self._stop.cancel()

    async def stop_on_signals(self) -> None:
        """Stop on the first SIGINT or SIGTERM; later ones are noted, not obeyed
        (run this until the node has stopped)."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                self.stop()

    def _locked(self, function: Callable[..., Any], *arguments: Any) -> Any:
        """Call `function` holding the node's lock (the evaluator's caches are not thread-safe)."""
        with self.node.lock:
            return function(*arguments)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._changed.wait()

    # --- peers ---------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        assert self.host is not None
        return str(self.host.get_id())

    def connected_peers(self) -> list[ID]:
        assert self.host is not None
        return [peer for peer in self.host.get_connected_peers() if str(peer) not in self.blocked]

    async def _watch_peers(self) -> None:
        """Track connections, drop banned peers, and re-dial bootstrap peers."""
        assert self.host is not None
        known: set[str] = set()
        while True:
            connected = {str(peer): peer for peer in self.host.get_connected_peers()}
            for name, peer in connected.items():
                if self.peers.is_banned(name) or name in self.blocked:
                    await self.host.disconnect(peer)
                    continue
                if name not in known:
                    try:
                        addresses = [str(a) for a in self.host.get_peerstore().addrs(peer)]
                    except Exception:
                        addresses = []
                    self.peers.on_connected(name, addresses)
                    log.info("peer connected %s", name)
            for name in known - set(connected):
                self.peers.on_disconnected(name)
                log.info("peer disconnected %s", name)
            known = {name for name in connected if not self.peers.is_banned(name) and name not in self.blocked}
            for address in self.config.bootstrap:
                await self._dial(address, connected)
            await trio.sleep(1.0)

    async def _dial(self, address: str, connected: dict[str, ID]) -> None:
        assert self.host is not None
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        except Exception as error:
            log.error("bootstrap address %s: %s", address, error)
            return
        if (
            str(info.peer_id) in connected
            or self.peers.is_banned(str(info.peer_id))
            or str(info.peer_id) in self.blocked
        ):
            return
        try:
            with trio.fail_after(5):
                await self.host.connect(info)
        except Exception as error:
            log.debug("dial %s failed: %s", address, error)
            network: Any = self.host.get_network()
            cache = getattr(network, "_negative_peer_cache", None)
            if isinstance(cache, dict):
                cache.pop(info.peer_id, None)

    def _reject(self, peer_id: str, what: str, reason: str, points: int) -> None:
        self.rejections = [*self.rejections[-99:], Rejection(time.time(), peer_id, what, reason)]
        banned = self.peers.penalize(peer_id, points, f"{what}: {reason}")
        log.warning("rejected %s from %s: %s%s", what, peer_id, reason, " (banned)" if banned else "")

    # --- gossip ----------------------------------------------------------------------

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

    async def import_block(self, block: Block, source: str) -> bool:
        """Import a block in a worker thread; a rule it breaks is the source's fault."""
        try:
            result = await trio.to_thread.run_sync(self.node.import_decoded, block)
        except (StaleBlock, UnknownParent) as error:
            log.info("ignored %s block %s from %s: %s", block.header.kind.name.lower(), block.hash.hex()[:16],
                     source, error)  # fmt: skip
            return False
        except InvalidBlock as error:
            self._reject(source, f"{block.header.kind.name.lower()} block {block.hash.hex()[:16]}", str(error),
                         PENALTY_INVALID)  # fmt: skip
            return False
        if not result.known:
            log.info(
                "imported %s block %d %s from %s", block.header.kind.name.lower(), block.header.height,
                block.hash.hex()[:16], source,
            )  # fmt: skip
            await self._after_import(block)
        return True

    async def _after_import(self, block: Block) -> None:
        if block.header.kind == Kind.VALIDATION:
            with self.node.lock:
                state = self.node.checkpoint()[1]
                for offender in [o for o in self.node.store.evidence if state.stake_of(o) <= 0]:
                    del self.node.store.evidence[offender]
        self._notify()
        if block.header.kind == Kind.TRAINING and self.config.validator_keys and self._tasks is not None:
            self._tasks.start_soon(self._attest, block)  # after the block is relayed, not before

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

    # --- sync --------------------------------------------------------------------------

    async def request(self, peer: ID, request: Request) -> bytes | None:
        """One sync request; the payload, or None when the peer has no such object."""
        assert self.host is not None
        with trio.fail_after(REQUEST_TIMEOUT):
            stream = await self.host.new_stream(peer, [TProtocol(sync_protocol(self.chain_id))])
            try:
                await write_frame(stream, request.encode())
                status, payload = await read_response(stream)
            finally:
                await stream.close()
        if status == NOT_FOUND:
            return None
        if status != OK:
            raise ProtocolError(f"{request.method}: peer error {payload.decode(errors='replace')}")
        return payload

    async def _serve_sync(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                try:
                    request = decode_request(await read_frame(stream))
                except (DecodeError, ProtocolError) as error:
                    self._reject(peer, "sync request", str(error), PENALTY_MALFORMED)
                    await write_response(stream, ERROR, str(error).encode())
                    return
                payload = await trio.to_thread.run_sync(self._answer, request)
                if self.link_delay:
                    await trio.sleep(self.link_delay)
                await write_response(stream, OK if payload is not None else NOT_FOUND, payload or b"")
        except (trio.TooSlowError, ProtocolError, Exception) as error:
            log.debug("sync stream from %s failed: %s", peer, error)
        finally:
            await stream.close()

    def _answer(self, request: Request) -> bytes | None:
        """The payload for a sync request (in a worker thread)."""
        node = self.node
        if request.method == "status":
            return self.status().encode()
        if request.method == "block":
            return node.encoded_block(request.arguments[0])
        if request.method in ("headers", "blocks"):
            start, count = request.arguments
            items: list[bytes] = []
            for height in range(start, start + min(count, MAX_BLOCKS_PER_REQUEST)):
                block = node.block_at(height)
                if block is None:
                    break
                items.append(block.encode() if request.method == "blocks" else pack(block.header.fields()))
            return pack(items)
        if request.method == "slice":
            return node.slice_content(request.arguments[0])
        if request.method == "chunk":
            digest = request.arguments[0]
            if not all(c in "0123456789abcdef" for c in digest):
                return None
            path = node.chunk_directory / f"{digest}.xz"
            return path.read_bytes() if path.exists() else None
        return None

    def status(self) -> StatusMessage:
        with self.node.lock:
            head, _ = self.node.head()
            checkpoint, _ = self.node.checkpoint()
            return StatusMessage(
                bytes.fromhex(self.node.genesis.hash), head.header.height, head.hash,
                checkpoint.header.height, checkpoint.hash,
            )  # fmt: skip

    def _request_sync(self, peer: ID) -> None:
        if self._sync_tasks is not None and str(peer) not in self._syncing_from:
            self._sync_tasks.start_soon(self._sync_from, peer)

    async def _sync_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            self._sync_tasks = nursery
            first = True
            while True:
                behind = False
                for peer in self.connected_peers():
                    if self.peers.is_banned(str(peer)):
                        continue
                    try:
                        payload = await self.request(peer, Request("status"))
                        if payload is None:
                            continue
                        status = StatusMessage.decode(payload)
                    except (DecodeError, ProtocolError) as error:
                        self._reject(str(peer), "status", str(error), PENALTY_MALFORMED)
                        continue
                    except Exception as error:
                        log.debug("status from %s failed: %s", peer, error)
                        continue
                    self.peers.get(str(peer)).head_height = status.head_height
                    if status.genesis_hash != bytes.fromhex(self.node.genesis.hash):
                        self._reject(str(peer), "status", "a different genesis", PENALTY_INVALID)
                        continue
                    head, _ = self.node.head()
                    # A head as high as ours that we lack: a racing block, or a sibling validation block.
                    if status.head_height >= head.header.height and not self.node.in_store(status.head_hash):
                        behind = behind or status.head_height > head.header.height + 1
                        if str(peer) not in self._syncing_from:
                            nursery.start_soon(self._sync_from, peer)
                self.syncing = behind or bool(self._syncing_from)
                if first or not self.ready:
                    self.ready = True
                    first = False
                await trio.sleep(SYNC_INTERVAL)

    async def _sync_from(self, peer: ID) -> None:
        """Fetch and import a peer's canonical blocks from our finalized block up
        (from the anchor, not the checkpoint: the peer may follow a sibling of
        our checkpoint, which is still open)."""
        name = str(peer)
        if name in self._syncing_from:
            return
        self._syncing_from.add(name)
        self.syncing = True
        try:
            while True:
                anchor = self.node.anchor()
                start = anchor.header.height + 1
                try:
                    payload = await self.request(peer, Request("blocks", (start, MAX_BLOCKS_PER_REQUEST)))
                    encoded = decode_block_list(payload or pack([]))
                    blocks = [decode_block(data) for data in encoded]
                except DecodeError as error:
                    self._reject(name, "blocks", str(error), PENALTY_MALFORMED)
                    return
                except Exception as error:
                    log.debug("sync from %s failed: %s", name, error)
                    return
                if not blocks:
                    return
                if blocks[0].header.parent != anchor.hash and not self.node.in_store(blocks[0].header.parent):
                    self._reject(name, "chain", f"does not descend from our finalized block at height "
                                 f"{anchor.header.height}", PENALTY_MALFORMED)  # fmt: skip
                    return
                imported = 0
                for block in blocks:
                    if self.node.is_known(block):
                        continue
                    if not await self.import_block(block, name):
                        return
                    imported += 1
                if imported == 0 or len(blocks) < MAX_BLOCKS_PER_REQUEST:
                    return
                log.info("synced to height %d from %s", blocks[-1].header.height, name)
        finally:
            self._syncing_from.discard(name)

    # --- validator duties ------------------------------------------------------------

    async def _attest(self, first: Block) -> None:
        """Our validators attest one training block per parent (a second is slashable).

        Which one: validators follow the proposer rotation. The first in it
        (the round's leader) attests the best block (largest validation gain,
        then lowest hash) once no new one has arrived for ATTEST_QUIET seconds;
        every other validator attests what the earliest validator before it in
        the rotation attested, as soon as it holds that attestation, and leads
        by the same rule itself if none has come ATTEST_WINDOW seconds per
        position after the first block (a silent or lying leader hands over to
        the next). Following keeps honest validators from splitting their stake
        between racing miners' blocks; no rule makes a split recoverable yet
        (docs/spec.md, section 14)."""
        parent_hash = first.header.parent
        if parent_hash in self._attest_windows:
            return
        self._attest_windows.add(parent_hash)
        state = self.node.state_of(parent_hash)
        if state is None:
            return
        rotation = get_validation_proposers(state, first)
        ours = {key.public_key for key in self.config.validator_keys}
        position = min((i for i, validator in enumerate(rotation) if validator in ours), default=len(rotation))
        opened = last_change = time.monotonic()
        seen: set[bytes] = set()
        training: Block | None = None
        recorded = {self.votes.attested_block(key.public_key, parent_hash) for key in self.config.validator_keys}
        while training is None:
            candidates = [b for b in self.node.pending_training_blocks() if b.header.parent == parent_hash]
            before_restart = [b for b in candidates if b.hash in recorded]
            if before_restart:
                training = before_restart[0]  # attested before a restart: the only block we may attest
                break
            if {b.hash for b in candidates} - seen:
                seen |= {b.hash for b in candidates}
                last_change = time.monotonic()
            for earlier in rotation[:position]:
                followed = [
                    b for b in candidates if any(a.validator == earlier for a in self.node.attestations_for(b.hash))
                ]
                if followed:
                    training = min(followed, key=rank_candidate)
                    break
            now = time.monotonic()
            if training is None and now - opened >= position * ATTEST_WINDOW and now - last_change >= ATTEST_QUIET:
                training = min(candidates, key=rank_candidate) if candidates else first
            if training is None:
                await trio.sleep(0.2)
        for key in self.config.validator_keys:
            if state.stake_of(key.public_key) <= 0:
                continue
            known = self.votes.attested_block(key.public_key, parent_hash)
            if known is not None and known != training.hash:
                log.warning("not attesting %s as %s: it attested %s on this parent before a restart",
                            training.hash.hex()[:16], key.public_key.hex()[:16], known.hex()[:16])  # fmt: skip
                continue
            await trio.to_thread.run_sync(self.votes.record, key.public_key, parent_hash, training.hash)
            attestation = await trio.to_thread.run_sync(self._locked, attest, self.node.chain, key, state, training)
            try:
                await trio.to_thread.run_sync(self.node.on_attestation, attestation)
            except InvalidBlock as error:  # the checkpoint moved on meanwhile
                log.info("own attestation not kept: %s", error)
                continue
            await self.publish(attestation_topic(self.chain_id), pack(attestation.fields()))
            log.info("attested %s as %s", training.hash.hex()[:16], key.public_key.hex()[:16])
            self._notify()

    async def _propose_loop(self) -> None:
        while True:
            await self._wait_change(0.25)
            for training in self.node.pending_training_blocks():
                await self._maybe_propose(training)

    async def _maybe_propose(self, training: Block) -> None:
        if training.hash in self._proposed:
            return
        with self.node.lock:
            state = self.node.state_of(training.header.parent)
            attestations = self.node.attestations_for(training.hash)
            evidence = list(self.node.store.evidence.values())
        if state is None:
            return
        attesting = sum(state.stake_of(a.validator) for a in attestations)
        if attesting < get_quorum_stake(state, self.node.chain):
            return
        now = time.monotonic()
        since = self._quorum_since.setdefault(training.hash, now)
        everyone = attesting >= state.total_stake
        rotation = get_validation_proposers(state, training)
        ours = {key.public_key: key for key in self.config.validator_keys}
        for position, address in enumerate(rotation):
            if address not in ours:
                continue
            due = since + position * PROPOSER_BACKOFF + (0 if everyone else QUORUM_GRACE)
            if now < due:
                return
            key = ours[address]
            self._proposed.add(training.hash)
            timestamp = max(int(time.time()), training.header.timestamp + 1)

            try:
                block = await trio.to_thread.run_sync(
                self._locked, propose_validation_block, self.node.chain, training, state, key, attestations,
                evidence, timestamp,
            )  # fmt: skip
            except InvalidBlock as error:
                log.error("could not build the validation block: %s", error)
                return
            if await self.import_block(block, "self"):
                await self.publish_block(block)
                assert isinstance(block.body, ValidationBody)
                verdict = "confirmed" if is_confirmed(block.body) else "rejected"
                log.info("proposed validation block %d (%s)", block.header.height, verdict)
            return

    # --- mining -------------------------------------------------------------------------

    async def _mine_loop(self, key: PrivateKey) -> None:
        node, genesis = self.node, self.node.genesis
        train_text = await trio.to_thread.run_sync(lambda: load_split(genesis.dataset, node.chunk_directory, "train"))
        miner = Miner(node.weights_of(node.checkpoint()[1]), node.chain.layout, train_text, self.config.training)
        proposed: dict[bytes, Block] = {}
        attempts = 0
        last_parent = b""
        while True:
            parent, state = node.checkpoint()
            if parent.hash != last_parent:
                self._credit_miner(miner, parent, proposed)
                last_parent, attempts = parent.hash, 0
                miner.train_text = self.training_text(parent, train_text)
            if parent.hash in proposed:
                await self._wait_change(1.0)
                continue
            slice_id = compute_assigned_slice(parent.header, key.public_key, genesis.partition.slices)
            seed = compute_training_seed(parent.hash, key.public_key) + attempts.to_bytes(4, "big")
            weights = node.weights_of(state)
            work = await trio.to_thread.run_sync(miner.work, weights, slice_id, seed)
            attempts += 1
            timestamp = max(int(time.time()), parent.header.timestamp + 1)

            block = await trio.to_thread.run_sync(
                self._locked, propose_best_training_block, node.chain, parent, state, key, work.values, timestamp,
                work.steps,
            )  # fmt: skip
            if node.checkpoint()[0].hash != parent.hash:
                continue  # the checkpoint moved while we trained: the work stays in the local model
            assert isinstance(block.body, TrainingBody)
            gain = block.body.loss_before - block.body.loss_after
            if gain < state.difficulty:
                log.info("mined gain %d below difficulty %d: training on", gain, state.difficulty)
                continue
            if await self.import_block(block, "self"):
                proposed[parent.hash] = block
                await self.announce_mined(block)
                log.info("mined training block %d gain %d slice %d", block.header.height, gain, slice_id)

    def _credit_miner(self, miner: Miner, checkpoint: Block, proposed: dict[bytes, Block]) -> None:
        """Tell the miner when the chain confirmed one of its updates (so it keeps its
        local progress on that slice rather than adopting the published values)."""
        body = checkpoint.body
        if isinstance(body, ValidationBody) and is_confirmed(body):
            for block in proposed.values():
                if block.hash == checkpoint.header.parent and isinstance(block.body, TrainingBody):
                    miner.published(block.body.slice_id, np.frombuffer(block.body.weights, dtype="<i2"))
        proposed.clear()

    # --- the RPC's view ----------------------------------------------------------------

    def submit_block(self, data: bytes) -> ImportResult:
        """Import a block handed in over the RPC and gossip it (from the RPC's thread)."""
        block = decode_block(data)
        assert self.trio_token is not None
        return trio.from_thread.run(self._submit, block, trio_token=self.trio_token)

    async def _submit(self, block: Block) -> ImportResult:
        result = await trio.to_thread.run_sync(self.node.import_decoded, block)
        if not result.known:
            await self._after_import(block)
            await self.publish_block(block)
        return result


class NetworkBackend:
    """The RPC's backend for a networked node."""

    def __init__(self, network: NetworkNode) -> None:
        self.network = network
        self.node = network.node

    def peers(self) -> list[dict[str, object]]:
        return self.network.peers.view()

    def is_ready(self) -> bool:
        return self.network.ready

    def is_syncing(self) -> bool:
        return self.network.syncing

    def submit_block(self, data: bytes) -> ImportResult:
        return self.network.submit_block(data)

    def node_info(self) -> dict[str, object]:
        network = self.network
        return {
            "peer_id": network.peer_id if network.host is not None else None,
            "addresses": network.listen_addresses,
            "orphaned_blocks": list(network.node.orphaned),
            "rejections": [
                {"time": r.time, "peer_id": r.peer_id, "what": r.what, "reason": r.reason} for r in network.rejections
            ],
            "blocked_peers": sorted(network.blocked),
            "link_delay_seconds": network.link_delay,
        }

    def set_blocked_peers(self, peers: list[str]) -> None:
        self.network.blocked = set(peers)

    def set_link_delay(self, seconds: float) -> None:
        self.network.link_delay = seconds
