"""The networked full node: one trio loop for libp2p, the chain and the duties.

`NetworkNode.run()` starts the libp2p host, joins the gossip topics, serves
the sync protocol, dials its bootstrap peers, and runs these tasks until it
is cancelled (SIGINT or SIGTERM):

- **gossip** (p2p/gossip.py): block announcements, attestations and evidence,
  each checked by a topic validator before it is relayed; a block is fetched
  from the peer that relayed it and imported before we relay it.
- **sync** (p2p/sync.py): every two seconds, ask each peer for its status and
  fetch and import the canonical blocks of a peer whose head we lack.
- **duties**: a validator attests the first valid training block on the
  checkpoint and proposes the validation block in its turn
  (p2p/validator_duties.py); a miner trains and proposes training blocks
  (p2p/miner_duty.py).

Every evaluation (imports, attestations, training) runs in a worker thread,
never on the event loop; the node's state is behind `FullNode.lock`.

`NetworkNode` is composed of one mixin class per part (`GossipMixin`,
`SyncMixin`, `ValidatorDuties`, `MinerDuty`), each in its own module. They
share the node's state, which `NetworkNode.__init__` sets up; each declares
the attributes it uses and the other parts' methods it calls. This module
holds what they all rely on: the lifecycle, the peers, and importing a block.
The RPC's backend for the node is in p2p/backend.py.
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
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from chain.blocks import Block, Kind, decode_block
from chain.crypto import PrivateKey
from consensus.rules import InvalidBlock, StaleBlock, UnknownParent
from p2p.full_node import FullNode, ImportResult
from p2p.gossip import GossipMixin
from p2p.host import load_or_create_node_key, make_host, make_pubsub
from p2p.miner_duty import MinerDuty
from p2p.peers import PENALTY_INVALID, PeerBook
from p2p.sync import SyncMixin
from p2p.validator_duties import ValidatorDuties
from p2p.votes import VoteRecord
from p2p.wire import attestation_topic, block_topic, evidence_topic, sync_protocol
from training.miner import TrainingConfig

log = logging.getLogger("potchain.node")


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


class NetworkNode(GossipMixin, SyncMixin, ValidatorDuties, MinerDuty):
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

    # --- importing -----------------------------------------------------------------

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
