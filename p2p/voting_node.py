"""The networked node on voting rounds: libp2p gossip and sync around a `NodeVoting`.

`VotingNode.run()` starts a libp2p host, serves the sync protocol, joins two
gossip topics and runs until cancelled:

- **blocks** (`/potchain/<chain id>/blocks/1`): announcements of training
  blocks (the proposal's inputs). A training block is fetched from the peer
  that relayed it and checked (`DecidedChain.on_training_block`) before it
  is relayed.
- **votes** (`/potchain/<chain id>/votes/1`): proposals, votes and commit
  certificates, each `[type, fields]` (1 vote, 2 proposal, 3 commit). A
  message is checked by `NodeVoting.on_message` (signature, the sender's
  stake, the round's proposer) before it is relayed; an invalid one costs
  its sender.
- **sync** (p2p/wire.py): `status`; `block [hash]` (a decided block, a
  training block kept or named, or a checked candidate); `headers` and
  `blocks [start, count]` of the decided chain; `slice [sha256]` and
  `chunk [digest]` (model slices and dataset chunks); and
  `decided [start, count]`: decided blocks with their commit certificates
  and the training blocks they name. A node behind its peers imports them
  (each checked, certificate and all) and then votes on the next height.

The voting effects run here: a message is gossiped after the key's signer
state is on disk (`NodeVoting` saves it), timers sleep in the nursery, a
candidate block (and the training blocks it names) is fetched from peers
and checked in a worker thread, a proposer's block is built in a worker
thread, and a decision is written to the store in one atomic batch.

Peers are tracked (connections, scores, bans) and bootstrap peers re-dialed.
For simulations and operators, a node can refuse a set of peers (a
partition) and delay everything it sends; the RPC sets both.
`potchain node` runs a `VotingNode` with the RPC (p2p/rpc.py) beside it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    MAX_TRAINING_PER_HEIGHT,
    Block,
    DecidedBody,
    Kind,
    TrainingBody,
    UpdateCommitment,
    decode_block,
    decode_update_commitment,
)
from chain.crypto import PrivateKey
from chain.encoding import DecodeError, Fields, pack, unpack
from chain.heldout import Shard
from chain.state import State
from chain.store import StorageError
from chain.votes import MAX_COMMIT_OBJECTS, Commit, Proposal, Vote, decode_commit
from consensus.rules import InvalidBlock, StaleBlock, UnknownParent, compute_next_slice, compute_training_seed
from consensus.voting import InvalidVote, Step, TimeoutParameters
from genesis import chunk_directory, devnet_shard
from p2p.decided_node import DecidedNode
from p2p.events import ATTESTATION, attestation_data
from p2p.host import load_or_create_node_key, make_host, make_pubsub
from p2p.logs import CatchUp, Progress
from p2p.mining import (
    MiningProgress,
    PreparedUpdate,
    find_applied,
    find_settled,
    get_awaited_miners,
    held_commitment,
    is_carried,
    prepare_update,
    reveal_update,
    train_round,
    validation_gain,
)
from p2p.peers import (
    BAN_SECONDS,
    PENALTY_FLOOD,
    PENALTY_INVALID,
    PENALTY_MALFORMED,
    PENALTY_WITHHELD,
    PeerBook,
    TokenBucket,
)
from p2p.signer import SignerRecord
from p2p.sync import REQUEST_TIMEOUT, send_request
from p2p.voting import BuildBlock, CheckCandidate, Decided, Effect, NodeVoting, Send, SetTimer
from p2p.wire import (
    ERROR,
    MAX_BLOCKS_PER_REQUEST,
    MAX_GOSSIP_BYTES,
    MAX_RESPONSE_BYTES,
    NOT_FOUND,
    OK,
    Announcement,
    ProtocolError,
    Request,
    StatusMessage,
    block_topic,
    decode_request,
    read_frame,
    sync_protocol,
    write_response,
)
from training.data import load_split
from training.miner import Miner, TrainingConfig

log = logging.getLogger("potchain.node")
T = TypeVar("T")

SYNC_INTERVAL = 2.0
SHUTDOWN_GRACE_SECONDS = 5.0
"""How long py-libp2p may take to close its connections once the node stops (dials to
departed peers it starts while closing otherwise ran on for minutes)."""
STATUS_TIMEOUT = 5.0
"""Seconds a peer has to answer a status request."""
RESEND_INTERVAL = 3.0
FETCH_ATTEMPTS = 40
FETCH_RETRY_SECONDS = 0.5
"""A candidate block is asked for again every half second, up to 20 s, while its height lasts."""
"""Seconds between re-sends of our latest voting messages."""
COMMITMENT_RESEND_SECONDS = 3.0
"""Seconds between re-sends of the miner's commitment while its height is undecided."""
VOTE_MESSAGE_TYPES = {Vote: 1, Proposal: 2, Commit: 3}
MAX_DECIDED_RESPONSE_BYTES = MAX_RESPONSE_BYTES - (1 << 20)
"""A `decided` answer holds as many heights as fit in this (always at least one): on the
testnet a height with an update carries a 6.4 MB training block, and 32 of them would
exceed the wire's response limit."""
MAX_DECIDED_OBJECTS = 1 + MAX_BLOCKS_PER_REQUEST * (4 + MAX_TRAINING_PER_HEIGHT)
"""Objects a `decided` answer may hold: per height an entry's array, the block, the
certificate, the array of training blocks it names and those blocks (byte strings all)."""
MAX_VOTING_MESSAGE_OBJECTS = 2 + MAX_COMMIT_OBJECTS
"""Objects a voting message may hold: its array, its type and a commit certificate at most."""
ENTRY_OVERHEAD = 64
"""Bytes of framing counted per `decided` entry (msgpack headers)."""
CANDIDATE_GRACE_SECONDS = 1.0
"""In a height's first round, how long a proposer that holds a training block waits for racing
miners' blocks and for the commitments of the next height (within the proposal wait)."""
MAX_REJECTIONS = 100
"""Rejected messages remembered for the RPC."""
MAX_ATTESTED = 4096
"""Proposals and votes remembered as published to the event stream (repeats are not published again)."""
BODY_FETCH_TIMEOUT = 10.0
"""Seconds an announcer has to serve the training block it announced."""
MAX_PENDING_PER_PEER = 4
"""Announcements of one peer fetched or checked at the same time; more are dropped unread."""
MAX_RECEIVING = 256
"""Announced training blocks being fetched or checked at the same time, from all peers."""
MAX_SERVING = 2
"""Sync requests answered at the same time, from all peers (each in a worker thread)."""
GLOBAL_REQUEST_BURST, GLOBAL_REQUEST_RATE = 128.0, 32.0
"""Bulk sync requests (BULK_METHODS) answered from all peers together: at once, then per
second (fresh identities each get a peer's budget; this bounds them together). A request over
it is answered busy at no cost to its sender; `status` and `block`, small and on the voting's
path, are outside it."""
BULK_METHODS = frozenset({"headers", "blocks", "decided", "slice", "chunk"})


@dataclass(frozen=True)
class Rejection:
    """An invalid message this node refused, for logs, the RPC and simulations."""

    time: float
    """When (Unix seconds)."""
    peer_id: str
    """Who sent or relayed it."""
    what: str
    """What it was (a training block, a voting message, a sync answer)."""
    reason: str
    """The rule it broke."""


def _describe(value: object) -> str:
    """A short form of a task argument for logs."""
    if isinstance(value, bytes):
        return value.hex()[:16]
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_decided_entries(payload: bytes) -> list[tuple[Block, Commit, dict[bytes, Block]]]:
    """A `decided` answer: each entry's block, certificate and the training blocks it names
    (raises DecodeError). Run in a worker thread: an answer may be 63 MiB."""
    entries = []
    for entry in unpack(payload, "decided", MAX_RESPONSE_BYTES, MAX_DECIDED_OBJECTS):
        f = Fields(entry, "decided entry", ("block", "commit", "training"))
        block = decode_block(f.binary("block"))
        commit = decode_commit(f.binary("commit"))
        training = {b.hash: b for b in (decode_block(data) for data in f.array("training"))}
        entries.append((block, commit, training))
    return entries


def commitments_topic(chain_id: str) -> str:
    """Miners' update commitments (docs/spec.md, section 17)."""
    return f"/potchain/{chain_id}/commitments/1"


def votes_topic(chain_id: str) -> str:
    return f"/potchain/{chain_id}/votes/1"


def encode_voting_message(message: Proposal | Vote | Commit) -> bytes:
    return pack([VOTE_MESSAGE_TYPES[type(message)], message.fields()])


def decode_voting_message(data: bytes) -> Proposal | Vote | Commit:
    value = unpack(data, "voting message", MAX_GOSSIP_BYTES, MAX_VOTING_MESSAGE_OBJECTS)
    f = Fields(value, "voting message", ("type", "message"))
    kind = f.integer("type", 1, 3)
    if kind == 1:
        return Vote.from_fields(f.raw("message"))
    if kind == 2:
        return Proposal.from_fields(f.raw("message"))
    return Commit.from_fields(f.raw("message"))


@dataclass
class VotingNodeConfig:
    """How to run one voting node."""

    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: list[str] = field(default_factory=list)
    validator_keys: list[PrivateKey] = field(default_factory=list)
    heldout_shards: dict[bytes, Shard] = field(default_factory=dict)
    """The validator keys' private held-out shards by public key: a proposal tests training blocks
    only with its key's shard (docs/spec.md, section 17). A key without one here, on a development
    network, uses its INSECURE devnet shard (`genesis.devnet_shard`), if genesis commits it to one."""
    timeouts: TimeoutParameters | None = None
    """The voting timeouts; None: genesis's (`consensus.timeout_*_ms`, sized from the model's evaluation cost)."""
    miner_key: PrivateKey | None = None
    """Mine with this key (None: do not mine)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The miner's training configuration."""
    max_peers: int = 64
    """Connections kept; beyond it the lowest-scored peers that are not bootstrap peers are dropped."""
    proposal_wait_seconds: float | None = None
    """How long a proposer waits in a height's first round for a training block on the head
    before proposing without one (node policy, like Tendermint's empty-block interval: a
    height decides without an update, but miners get time to offer one, and the chain does
    not race through empty heights). The first round's propose timeout is this much longer,
    so that validators wait for such a proposal. None: the propose timeout."""


def validator_shards(node: DecidedNode, config: VotingNodeConfig) -> dict[bytes, Shard]:
    """Each validator key's held-out shard: the configured one, or its devnet shard on a development network."""
    shards = dict(config.heldout_shards)
    for key in config.validator_keys:
        if key.public_key not in shards:
            shard = devnet_shard(node.genesis, node.genesis_path, key.public_key)
            if shard is not None:
                shards[key.public_key] = shard
    return shards


class VotingNode:
    """See the module docstring."""

    def __init__(self, node: DecidedNode, config: VotingNodeConfig) -> None:
        self.node = node
        self.config = config
        self.chain_id = node.genesis.chain_id
        self.peers = PeerBook()
        self.timeouts = config.timeouts or node.genesis.consensus.timeouts
        self.voting = NodeVoting(
            node.decided,
            {key.public_key: key for key in config.validator_keys},
            SignerRecord.open(node.datadir / "signer"),
            self.timeouts,
            node.keep_signed,
            shards=validator_shards(node, config),
        )
        self.host: IHost | None = None
        self.pubsub: Pubsub | None = None
        self.listen_addresses: list[str] = []
        self._tasks: trio.Nursery | None = None
        self._stop: trio.CancelScope | None = None
        self._shutdown: trio.CancelScope | None = None
        self._checking: set[bytes] = set()
        self._voting_limiter = trio.CapacityLimiter(1)
        self._serving_limiter = trio.CapacityLimiter(MAX_SERVING)
        self._requests = TokenBucket(GLOBAL_REQUEST_BURST, GLOBAL_REQUEST_RATE)
        self._verifying_limiter = trio.CapacityLimiter(1)
        self._asking: set[ID] = set()
        """Peers whose status is being asked."""
        self._heads: dict[ID, tuple[float, int]] = {}
        """Per connected peer: when (trio time) it last reported its status, and its head height."""
        self._receiving: dict[bytes, list[ID]] = {}
        """Announced training blocks being fetched or checked: who announced each (first first)."""
        self._pending: dict[str, int] = {}
        """Per peer: its announcements being fetched or checked."""
        self.failure: str | None = None
        """Why the node stopped on its own (a failed disk write), or None."""
        self.decisions = trio.Event()
        """Set (and replaced) at every decision, for waiters."""
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self.ready = False
        """True once the host listens and the voting started."""
        self.syncing = False
        """True while importing decided blocks from a peer ahead of us."""
        self._catch_up = CatchUp()
        """The progress (rate, ETA) of importing many heights from peers ahead."""
        self.rejections: list[Rejection] = []
        """The latest invalid messages refused (at most MAX_REJECTIONS)."""
        self._attested: set[tuple[object, ...]] = set()
        """Proposals and votes of the heights being decided already published as attestation events."""
        self.blocked: set[str] = set()
        """Peer ids this node refuses (set over the RPC to partition a test network)."""
        self.link_delay = 0.0
        """Seconds added before everything this node sends (set over the RPC to slow a test node's links)."""

    @property
    def peer_id(self) -> str:
        assert self.host is not None
        return str(self.host.get_id())

    def stop(self) -> None:
        """Cancel the node's tasks (from the trio thread); py-libp2p then has
        SHUTDOWN_GRACE_SECONDS to close its connections and services."""
        if self._stop is not None:
            self._stop.cancel()
        if self._shutdown is not None:
            self._shutdown.deadline = min(self._shutdown.deadline, trio.current_time() + SHUTDOWN_GRACE_SECONDS)

    async def stop_on_signals(self) -> None:
        """Stop on the first SIGINT or SIGTERM; later ones are noted, not obeyed
        (run this until the node has stopped)."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                self.stop()

    async def run_behaviour(self) -> None:
        """A subclass's own behaviour, run beside the node's duties (the simulation's
        adversaries, sim/adversaries/); an honest node has none."""

    def connected_peers(self) -> list[ID]:
        """Connected peers this node talks to (not blocked, not banned)."""
        assert self.host is not None
        return [
            peer
            for peer in self.host.get_connected_peers()
            if str(peer) not in self.blocked and not self.peers.is_banned(str(peer))
        ]

    def _reject(self, peer_id: str, what: str, reason: str, points: int) -> None:
        self.rejections = [*self.rejections[-(MAX_REJECTIONS - 1) :], Rejection(time.time(), peer_id, what, reason)]
        banned = self.peers.penalize(peer_id, points, f"{what}: {reason}")
        self.node.metrics.on_rejection(what, points)
        fields = {"peer": peer_id, "what": what, "reason": reason, "points": points, "banned": banned}
        log.warning("rejected %s from %s: %s%s", what, peer_id, reason, " (banned)" if banned else "", extra=fields)
        if banned:
            self._ban(peer_id)

    def _ban(self, peer_id: str) -> None:
        """Enforce a ban at once: gossip from the peer is dropped before it is read (py-libp2p's
        blacklist) and the connection closed; sync and dialing check the book."""
        log.warning("peer %s banned for %.0f s", peer_id, BAN_SECONDS, extra={"peer": peer_id, "seconds": BAN_SECONDS})
        peer = ID.from_base58(peer_id)
        if self.pubsub is not None:
            self.pubsub.add_to_blacklist(peer)
        if self.host is not None and self._tasks is not None:
            self._tasks.start_soon(self._guarded, self._disconnect, peer)

    async def _disconnect(self, peer: ID) -> None:
        assert self.host is not None
        with trio.move_on_after(5):
            await self.host.disconnect(peer)

    def _screen(self, forwarder: ID) -> bool | None:
        """A gossip message's fate before it is read: dropped (a blocked or banned peer's),
        accepted (our own, already checked), or None: check it."""
        if str(forwarder) in self.blocked or self.peers.is_banned(str(forwarder)):
            return False
        if self.host is not None and forwarder == self.host.get_id():
            return True
        return None

    async def run(self, on_started: Callable[[VotingNode], Awaitable[None] | None] | None = None) -> None:
        host = make_host(load_or_create_node_key(self.node.datadir / "node_key"), self.config.max_peers)
        pubsub, router = make_pubsub(host)
        self.host, self.pubsub = host, pubsub
        self.trio_token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.CancelScope()
        with self._shutdown:
            listen = [multiaddr.Multiaddr(self.config.listen)]
            async with (
                host.run(listen_addrs=listen),
                background_trio_service(pubsub),
                background_trio_service(router),
            ):
                await pubsub.wait_until_ready()
                host.set_stream_handler(TProtocol(sync_protocol(self.chain_id)), self._serve_sync)
                self.listen_addresses = [str(address) for address in host.get_addrs()]
                async with trio.open_nursery() as tasks:
                    self._stop, self._tasks = tasks.cancel_scope, tasks
                    topics: list[tuple[str, Callable[[ID, rpc_pb2.Message], Awaitable[bool]]]] = [
                        (block_topic(self.chain_id), self._validate_block_message),
                        (votes_topic(self.chain_id), self._validate_voting_message),
                        (commitments_topic(self.chain_id), self._validate_commitment_message),
                    ]
                    for topic, validator in topics:
                        pubsub.set_topic_validator(topic, validator, True)
                        subscription = await pubsub.subscribe(topic)
                        tasks.start_soon(self._guarded, self._drain_loop, subscription)
                    tasks.start_soon(self._guarded, self._peers_loop)
                    tasks.start_soon(self._guarded, self._sync_loop)
                    tasks.start_soon(self._guarded, self._resend_loop)
                    if self.config.miner_key is not None:
                        tasks.start_soon(self._guarded, self._mine_loop, self.config.miner_key)
                    tasks.start_soon(self._guarded, self.run_behaviour)
                    await self._carry_out(await self._voting_call(self.voting.start, int(time.time())))
                    self.ready = True
                    log.info("listening on %s", " ".join(self.listen_addresses))
                    if on_started is not None:
                        result = on_started(self)
                        if result is not None:
                            await result
        pubsub.seen_messages.stop()

    def fail(self, reason: str) -> None:
        """Stop the node on its own, for `reason` (kept in `failure`, logged, and reported by
        `potchain node` on exit): for errors it must not run on after, like a failed disk write."""
        if self.failure is None:
            self.failure = reason
            log.critical("stopping: %s", reason)
        self.stop()

    async def _guarded(self, task: Callable[..., Awaitable[None]], *arguments: Any) -> None:
        """Run a task under supervision: an unexpected error is logged with the task's name and
        arguments, and a loop is restarted a second later, a one-off effect (a timer, a check)
        dropped: a bug in one duty must not stop the others. A loop that keeps failing is
        logged each time; an error the node must not run on after stops it (`fail`)."""
        while True:
            try:
                await task(*arguments)
                return
            except Exception:
                described = ", ".join(_describe(argument) for argument in arguments)
                log.exception("task %s(%s) failed", task.__name__, described)
                if not task.__name__.endswith("_loop"):
                    return
                await trio.sleep(1.0)

    # --- effects ----------------------------------------------------------------

    async def _carry_out(self, effects: list[Effect]) -> None:
        assert self._tasks is not None
        for effect in effects:  # the votes signed here, published before the decision they may make
            if isinstance(effect, Send):
                self._attest(effect.message)
            elif isinstance(effect, Decided) and effect.decision.commit is not None:
                self._attest(effect.decision.commit)  # it may carry a precommit signed here and not yet sent
        for effect in effects:
            if isinstance(effect, Send):
                await self._publish(votes_topic(self.chain_id), encode_voting_message(effect.message))
            elif isinstance(effect, SetTimer):
                self._tasks.start_soon(self._guarded, self._timer, effect)
            elif isinstance(effect, CheckCandidate):
                if effect.block_hash not in self._checking:
                    self._checking.add(effect.block_hash)
                    self._tasks.start_soon(self._guarded, self._check_once, effect.block_hash)
            elif isinstance(effect, BuildBlock):
                self._tasks.start_soon(self._guarded, self._build, effect)
            elif isinstance(effect, Decided):
                try:
                    await trio.to_thread.run_sync(self.node.store, effect.decision)
                except Exception as error:  # the disk failed: voting on without it would lose the decision
                    height = effect.decision.block.header.height
                    self.fail(f"writing decided height {height} failed: {type(error).__name__}: {error}")
                    return
                decided = effect.decision.block
                round_number = effect.decision.commit.round if effect.decision.commit is not None else 0
                fields = {"height": decided.header.height, "hash": decided.hash.hex(), "round": round_number,
                          "proposer": decided.header.proposer.hex()}  # fmt: skip
                log.info("decided height %d %s in round %d", decided.header.height, decided.hash.hex()[:16],
                         round_number, extra=fields)  # fmt: skip
                self._checking.clear()
                self.decisions.set()
                self.decisions = trio.Event()

    async def _timer(self, effect: SetTimer) -> None:
        seconds = effect.milliseconds / 1000
        if effect.timeout.step == Step.PROPOSE and effect.timeout.round == 0:
            seconds += self._proposal_wait()  # the proposer may wait that long for a training block
        await trio.sleep(seconds)
        await self._carry_out(await self._voting_call(self.voting.on_timeout, effect.validator, effect.timeout))

    async def _build(self, effect: BuildBlock) -> None:
        deadline = trio.current_time() + (self._proposal_wait() if effect.round == 0 else 0.0)
        while not self.node.decided.training and trio.current_time() < deadline:
            await trio.sleep(0.1)
        if self.node.decided.training:  # racing miners' blocks and the next height's commitments
            await trio.sleep(max(0.0, min(CANDIDATE_GRACE_SECONDS, deadline - trio.current_time())))
        while trio.current_time() < deadline and get_awaited_miners(self.node.decided):
            await trio.sleep(0.1)  # a miner that revealed on the head is training its next round
        if effect.height != self.voting.height:
            return
        block = await self._voting_call(self.voting.build_block, effect.validator)
        await self._carry_out(await self._voting_call(self.voting.on_value, effect.validator, effect.round, block))

    def _proposal_wait(self) -> float:
        wait = self.config.proposal_wait_seconds
        return self.timeouts.propose_ms / 1000 if wait is None else wait

    async def _voting_call(self, function: Callable[..., T], *arguments: Any) -> T:
        """Call into the node's voting (or the chain) holding the node's lock, in a worker
        thread: the lock may be held for whole evaluations (a candidate's check, a training
        block's), and the trio thread, which runs libp2p, must never wait on it. One call at a
        time, in the order asked (the limiter is fair). A failed write of a block a key was to
        sign for (StorageError: nothing was signed) stops the node."""

        def locked() -> T:
            with self.node.lock:
                self.voting.on_tick(int(time.time()))
                result = function(*arguments)
                furthest = max((machine.round for machine in self.voting.machines.values()), default=0)
                self.node.metrics.on_voting(self.voting.height, furthest)
                return result

        try:
            return await trio.to_thread.run_sync(locked, limiter=self._voting_limiter)
        except StorageError as error:  # the store refuses every later write: voting on would lose locks
            self.fail(f"keeping a block to sign for failed: {error}")
            raise

    async def _check_once(self, block_hash: bytes) -> None:
        """Check a candidate; a later `CheckCandidate` for it checks again only if this one failed."""
        try:
            await self._check_candidate(block_hash)
        finally:
            self._checking.discard(block_hash)

    async def _check_candidate(self, block_hash: bytes) -> None:
        """Fetch a proposed block and the training blocks it names, check it, tell the machines."""
        height = self.voting.height
        block = await trio.to_thread.run_sync(self.node.block_by_hash, block_hash)
        for _ in range(FETCH_ATTEMPTS):  # a peer may get the block only after we asked: ask again
            if block is not None or height != self.voting.height:
                break
            block = await self._fetch_any(block_hash)
            if block is None:
                await trio.sleep(FETCH_RETRY_SECONDS)
        if block is None or height != self.voting.height:
            return
        training: dict[bytes, Block] = {}
        if isinstance(block.body, DecidedBody):
            for verdict in block.body.training:
                named = await trio.to_thread.run_sync(self.node.block_by_hash, verdict.training_block)
                named = named or await self._fetch_any(verdict.training_block)
                if named is not None:
                    training[named.hash] = named
        try:
            await trio.to_thread.run_sync(self.node.check_candidate, block, training)
            valid = True
        except InvalidBlock as error:
            log.info("candidate %s invalid: %s", block_hash.hex()[:16], error,
                     extra={"hash": block_hash.hex(), "height": height, "reason": str(error)})  # fmt: skip
            self.node.metrics.rejections.labels("candidate", "invalid").inc()
            valid = False
        if height == self.voting.height:
            await self._carry_out(await self._voting_call(self.voting.on_block_checked, block_hash, valid))

    # --- gossip -----------------------------------------------------------------

    async def _drain_loop(self, subscription: Any) -> None:
        while True:
            await subscription.get()

    async def _publish(self, topic: str, data: bytes) -> None:
        """Gossip a message (after the node's added link delay, if any)."""
        assert self.pubsub is not None
        if self.link_delay:
            await trio.sleep(self.link_delay)
        await self.pubsub.publish(topic, data)
        self.node.metrics.on_gossip(topic, "out", len(data))

    async def publish_training_block(self, block: Block) -> None:
        """Keep a training block (ours, say) and announce it."""
        await trio.to_thread.run_sync(self.node.on_training_block, block)
        await self._publish(block_topic(self.chain_id), Announcement.of(block).encode())

    def submit_training_block(self, data: bytes) -> tuple[Block, bool]:
        """Keep and announce a training block handed in over the RPC (from the RPC's thread);
        (the block, whether it was already kept). Raises DecodeError or InvalidBlock."""
        block = decode_block(data)
        if block.header.kind != Kind.TRAINING:
            raise InvalidBlock(f"kind: only training blocks are submitted, not {block.header.kind.name.lower()}")
        assert self.trio_token is not None
        return block, trio.from_thread.run(self._submit, block, trio_token=self.trio_token)

    async def _submit(self, block: Block) -> bool:
        kept = await trio.to_thread.run_sync(self.node.on_training_block, block)
        if kept:
            await self._publish(block_topic(self.chain_id), Announcement.of(block).encode())
        return not kept

    def submit_commitment(self, data: bytes) -> tuple[UpdateCommitment, bool]:
        """Keep and gossip a miner's commitment handed in over the RPC (from the RPC's thread);
        (the commitment, whether it was kept now). Raises DecodeError, StaleBlock, UnknownParent
        or InvalidBlock. One the node already holds is gossiped again (a miner re-sends it while
        its height lasts); another of the same miner's is not gossiped."""
        commitment = decode_update_commitment(data)
        assert self.trio_token is not None
        return commitment, trio.from_thread.run(self._submit_commitment, commitment, trio_token=self.trio_token)

    async def _submit_commitment(self, commitment: UpdateCommitment) -> bool:
        kept = await trio.to_thread.run_sync(self.node.on_commitment, commitment)
        if kept or await trio.to_thread.run_sync(held_commitment, self.node, commitment.miner) == commitment:
            await self._publish(commitments_topic(self.chain_id), commitment.encode())
        return kept

    async def publish_commitment(self, commitment: UpdateCommitment) -> bool:
        """Keep a miner's commitment (ours, say) for the next decided block and gossip it;
        False if one of that miner's was kept already. Raises StaleBlock, UnknownParent or
        InvalidBlock (`DecidedChain.on_commitment`)."""
        kept = await trio.to_thread.run_sync(self.node.on_commitment, commitment)
        await self._publish(commitments_topic(self.chain_id), commitment.encode())
        return kept

    async def _validate_commitment_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        """A miner's commitment: kept and relayed if it is for the height being decided and
        signed by its miner, the first of that miner's; one for another height is dropped (not a
        fault: the sender may be a height ahead or behind)."""
        if (verdict := self._screen(forwarder)) is not None:
            return verdict
        peer = str(forwarder)
        self.node.metrics.on_gossip(commitments_topic(self.chain_id), "in", len(message.data))
        try:
            commitment = decode_update_commitment(message.data)
        except DecodeError as error:
            self._reject(peer, "update commitment", str(error), PENALTY_MALFORMED)
            return False
        try:
            return await trio.to_thread.run_sync(self.node.on_commitment, commitment)
        except (StaleBlock, UnknownParent):
            return False
        except InvalidBlock as error:
            points = PENALTY_INVALID if ID(message.from_id) == forwarder else 0
            self._reject(peer, "update commitment", str(error), points)
            return False

    async def _validate_voting_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        if (verdict := self._screen(forwarder)) is not None:
            return verdict
        peer = str(forwarder)
        self.node.metrics.on_gossip(votes_topic(self.chain_id), "in", len(message.data))
        try:
            decoded = decode_voting_message(message.data)
        except (DecodeError, ValueError) as error:
            self._reject(peer, "voting message", str(error), PENALTY_MALFORMED)
            return False
        height = self.voting.height
        if decoded.height < height:
            return False  # an earlier height: stale, not a fault
        try:
            effects = await self._voting_call(self.voting.on_message, decoded)
        except InvalidVote as error:
            # Only the message's originator answers for it: a node relays messages of heights it
            # has not reached unchecked (it cannot check them), so an honest node a height behind
            # relays what its peers then find invalid (a proposer of the new validator set, say).
            origin = ID(message.from_id)
            if origin != forwarder:
                self._reject(peer, "voting message", f"{error} (relayed from {origin}: no penalty)", 0)
            elif self._is_staked_proposal(decoded):
                # A staked validator's signed proposal for a round that is not its turn in our view:
                # its view of the height may differ from ours (it just caught up); not worth a ban.
                self._reject(peer, "voting message", f"{error} (a validator's own proposal: no penalty)", 0)
            else:
                self._reject(peer, "voting message", str(error), PENALTY_INVALID)
            return False
        if decoded.height == height:  # checked (a message of the next height waits unchecked)
            self._attest(decoded)
        await self._carry_out(effects)
        return True

    def _attest(self, message: Proposal | Vote | Commit) -> None:
        """Publish a valid proposal or vote, signed here or received, as an attestation event; a
        commit certificate as its precommits. Each once: messages are re-sent every few seconds."""
        if isinstance(message, Commit):
            for precommit in message.precommits():
                self._attest(precommit)
            return
        data = attestation_data(message)
        key = tuple(data.values())
        if key in self._attested:
            return
        if len(self._attested) >= MAX_ATTESTED:
            height = self.voting.height
            self._attested = {seen for seen in self._attested if isinstance(seen[0], int) and seen[0] >= height}
            if len(self._attested) >= MAX_ATTESTED:
                self._attested.clear()
        self._attested.add(key)
        self.node.events.publish(ATTESTATION, data)

    def _is_staked_proposal(self, message: Proposal | Vote | Commit) -> bool:
        """A proposal signed by the validator it names, one with stake at our head."""
        if not isinstance(message, Proposal):
            return False
        stakes = self.node.head().state.accounts
        account = stakes.get(message.proposer)
        return account is not None and account.stake > 0 and message.is_signed_by_proposer(self.node.chain.domain)

    async def _validate_block_message(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        """An announcement is read at once and never waits for its body: a new training block on
        our head is fetched and checked in a task of its own (`_receive_training_block`), which
        announces it afresh once it is kept. The message itself is never relayed, so a slow or
        withholding announcer holds none of py-libp2p's few validation slots."""
        if (verdict := self._screen(forwarder)) is not None:
            return verdict
        peer = str(forwarder)
        self.node.metrics.on_gossip(block_topic(self.chain_id), "in", len(message.data))
        try:
            announcement = Announcement.decode(message.data)
        except DecodeError as error:
            self._reject(peer, "block announcement", str(error), PENALTY_MALFORMED)
            return False
        block_hash = announcement.block_hash
        if announcement.header.kind != Kind.TRAINING or block_hash in self.node.decided.training:
            return False
        if announcement.header.parent != self.node.head().block.hash:
            return False  # on an earlier decided block (late), or on one we have not decided yet
        announcers = self._receiving.get(block_hash)
        if announcers is not None:  # being fetched: another relay to ask if the first fails
            if forwarder not in announcers and len(announcers) < 8:
                announcers.append(forwarder)
            return False
        if self._pending.get(peer, 0) >= MAX_PENDING_PER_PEER or len(self._receiving) >= MAX_RECEIVING:
            return False
        if not self.peers.take_verification(peer):
            log.debug("announcement %s from %s over its verification budget", block_hash.hex()[:16], peer)
            return False
        assert self._tasks is not None
        self._receiving[block_hash] = [forwarder]
        self._pending[peer] = self._pending.get(peer, 0) + 1
        self._tasks.start_soon(self._guarded, self._receive_training_block, announcement)
        return False

    async def _receive_training_block(self, announcement: Announcement) -> None:
        """Fetch an announced training block from its announcers in turn, check it, keep it and
        announce it. An announcer that does not serve it while it is still on our head pays
        PENALTY_WITHHELD (an honest node serves what it announced); one whose block breaks a rule
        pays PENALTY_INVALID."""
        block_hash = announcement.block_hash
        announcers = self._receiving[block_hash]
        first = str(announcers[0])
        try:
            block = None
            for announcer in announcers:  # the list grows while we ask
                if self.peers.is_banned(str(announcer)) or str(announcer) in self.blocked:
                    continue
                block = await self._fetch(announcer, block_hash, BODY_FETCH_TIMEOUT)
                if block is not None:
                    break
                if announcement.header.parent == self.node.head().block.hash:
                    reason = f"announced block {block_hash.hex()[:16]} and did not serve it"
                    self._reject(str(announcer), "block announcement", reason, PENALTY_WITHHELD)
            if block is None or block.header != announcement.header:
                return
            async with self._verifying_limiter:
                if self.peers.is_banned(first) or block.header.parent != self.node.head().block.hash:
                    return
                try:
                    kept = await trio.to_thread.run_sync(self.node.on_training_block, block)
                except (StaleBlock, UnknownParent):
                    return
                except InvalidBlock as error:
                    self._reject(first, f"training block {block_hash.hex()[:16]}", str(error), PENALTY_INVALID)
                    return
            self.peers.on_valid_block(first)
            if kept:
                log.info("kept training block %s from %s", block_hash.hex()[:16], first,
                         extra={"hash": block_hash.hex(), "height": block.header.height, "peer": first,
                                "proposer": block.header.proposer.hex()})  # fmt: skip
                await self._publish(block_topic(self.chain_id), Announcement.of(block).encode())
        finally:
            del self._receiving[block_hash]
            remaining = self._pending.get(first, 1) - 1
            if remaining > 0:
                self._pending[first] = remaining
            else:
                self._pending.pop(first, None)

    # --- sync -------------------------------------------------------------------

    async def request(self, peer: ID, request: Request) -> bytes | None:
        assert self.host is not None
        self.node.metrics.on_sync_sent(request.method)
        return await send_request(self.host, self.chain_id, peer, request)

    async def _fetch(self, peer: ID, block_hash: bytes, timeout: float = REQUEST_TIMEOUT) -> Block | None:
        try:
            with trio.fail_after(timeout):
                data = await self.request(peer, Request("block", (block_hash,)))
            block = await trio.to_thread.run_sync(decode_block, data) if data is not None else None
        except (DecodeError, ProtocolError, trio.TooSlowError, OSError, Exception) as error:
            log.info("fetching %s from %s failed: %s", block_hash.hex()[:16], peer, error)
            return None
        if block is not None and block.hash != block_hash:
            self._reject(str(peer), "block", "served another block than asked", PENALTY_MALFORMED)
            return None
        return block

    async def _fetch_any(self, block_hash: bytes) -> Block | None:
        """Ask every connected peer at once; the first to serve the block wins (one slow or
        withholding peer delays nothing). The requests run as tasks of the node, and this
        waits only for the first block or for every request to end: a request py-libp2p holds
        past its timeout (a shielded reset of a dead connection) holds up nothing here."""
        assert self._tasks is not None
        peers = self.connected_peers()
        sender, receiver = trio.open_memory_channel[Block | None](len(peers))

        async def ask(peer: ID) -> None:
            block = None
            try:
                block = await self._fetch(peer, block_hash)
            finally:
                sender.send_nowait(block)

        for peer in peers:
            self._tasks.start_soon(self._guarded, ask, peer)
        with trio.move_on_after(REQUEST_TIMEOUT + 1):
            for _ in peers:
                block = await receiver.receive()
                if block is not None:
                    return block
        return None

    async def _serve_sync(self, stream: INetStream) -> None:
        """Answer one sync request, within the peer's budgets (p2p/peers.py): requests and bytes
        per second, streams at once; a request over them is answered "busy" and costs a little.
        At most MAX_SERVING answers are computed at once, each in a worker thread."""
        peer = str(stream.muxed_conn.peer_id)
        record = None
        try:
            if peer in self.blocked or self.peers.is_banned(peer):
                return
            with trio.fail_after(REQUEST_TIMEOUT):
                try:
                    request = decode_request(await read_frame(stream))
                except (DecodeError, ProtocolError) as error:
                    self._reject(peer, "sync request", str(error), PENALTY_MALFORMED)
                    await write_response(stream, ERROR, str(error).encode())
                    return
                if request.method in BULK_METHODS and not self._requests.take():
                    await write_response(stream, ERROR, b"busy: the node is answering too many requests")
                    return
                if not self.peers.take_request(peer):
                    self._reject(peer, "sync request", "busy: over the peer's request budget", PENALTY_FLOOD)
                    await write_response(stream, ERROR, b"busy: over your request budget, ask again later")
                    return
                record = self.peers.get(peer)
                record.open_streams += 1
                payload = await trio.to_thread.run_sync(self._answer, request, limiter=self._serving_limiter)
                if payload is not None and not self.peers.take_bytes(peer, len(payload)):
                    await write_response(stream, ERROR, b"busy: over your byte budget, ask again later")
                    return
                if self.link_delay:
                    await trio.sleep(self.link_delay)
                await write_response(stream, OK if payload is not None else NOT_FOUND, payload or b"")
                self.node.metrics.on_sync_served(request.method)
        except Exception as error:
            log.debug("sync stream from %s failed: %s", peer, error)
        finally:
            if record is not None:
                record.open_streams -= 1
            await stream.close()

    def _answer(self, request: Request) -> bytes | None:
        node = self.node
        if request.method == "status":
            head = node.head().block
            genesis = bytes.fromhex(node.genesis.hash)
            return StatusMessage(genesis, head.header.height, head.hash, head.header.height, head.hash).encode()
        if request.method == "block":
            block = node.block_by_hash(request.arguments[0])
            return None if block is None else block.encode()
        if request.method in ("headers", "blocks"):
            start, count = request.arguments
            items: list[bytes] = []
            for height in range(start, start + min(count, MAX_BLOCKS_PER_REQUEST)):
                decided = node.block_at(height)
                if decided is None:
                    break
                items.append(decided.encode() if request.method == "blocks" else pack(decided.header.fields()))
            if request.method == "blocks":
                node.metrics.sync_blocks_served.inc(len(items))
            return pack(items)
        if request.method == "slice":
            return node.slice_content(request.arguments[0])
        if request.method == "chunk":
            digest = request.arguments[0]
            if not all(c in "0123456789abcdef" for c in digest):
                return None
            path = node.chunk_directory / f"{digest}.xz"
            return path.read_bytes() if path.exists() else None
        if request.method == "decided":
            start, count = request.arguments
            entries: list[Any] = []
            size = 0
            for height in range(max(1, start), start + min(count, MAX_BLOCKS_PER_REQUEST)):
                block = node.block_at(height)
                commit = None if block is None else node.commit_of(block.hash)
                if block is None or commit is None or not isinstance(block.body, DecidedBody):
                    break
                named = [node.stored_block(v.training_block) for v in block.body.training]
                encoded, certificate = block.encode(), commit.encode()
                training = [b.encode() for b in named if b is not None]
                entry_size = len(encoded) + len(certificate) + sum(map(len, training)) + ENTRY_OVERHEAD
                if entries and size + entry_size > MAX_DECIDED_RESPONSE_BYTES:
                    break  # the rest in the next request: a response stays under the wire's limit
                entries.append([encoded, certificate, training])
                size += entry_size
            node.metrics.sync_blocks_served.inc(len(entries))
            return pack(entries)
        return None

    async def _sync_loop(self) -> None:
        """Every SYNC_INTERVAL: ask every peer's status (each in a task of its own, within
        STATUS_TIMEOUT; one still unanswered is not asked again), then import from the peers
        whose recent status is ahead of us, highest head first. Nothing here waits on a peer
        that does not answer: py-libp2p may hold a stream to a dead connection past any timeout
        while it resets it (shielded), and the loop must not hang with it."""
        assert self._tasks is not None
        while True:
            for peer in self.connected_peers():
                if peer not in self._asking:
                    self._asking.add(peer)
                    self._tasks.start_soon(self._guarded, self._ask_status, peer)
            await trio.sleep(SYNC_INTERVAL)
            connected = set(self.connected_peers())
            recent = trio.current_time() - (SYNC_INTERVAL + STATUS_TIMEOUT)
            self._heads = {peer: seen for peer, seen in self._heads.items() if peer in connected}
            ahead = [
                peer for peer, (when, height) in self._heads.items() if when >= recent and height >= self.voting.height
            ]
            for peer in sorted(ahead, key=lambda p: -self._heads[p][1]):
                if not self.peers.is_banned(str(peer)) and self._heads[peer][1] >= self.voting.height:
                    await self._sync_from(peer)

    async def _ask_status(self, peer: ID) -> None:
        try:
            with trio.fail_after(STATUS_TIMEOUT):
                payload = await self.request(peer, Request("status"))
            status = StatusMessage.decode(payload or b"")
            if status.genesis_hash.hex() == self.node.genesis.hash:
                self._heads[peer] = (trio.current_time(), status.head_height)
                self.peers.get(str(peer)).head_height = status.head_height
        except Exception as error:
            log.debug("status from %s failed: %s", peer, error)
        finally:
            self._asking.discard(peer)

    async def _sync_from(self, peer: ID) -> None:
        """Import a peer's decided blocks above our head, each with its certificate; then vote on."""
        moved = False
        self.syncing = True
        try:
            payload = await self.request(peer, Request("decided", (self.voting.height, MAX_BLOCKS_PER_REQUEST)))
            entries = await trio.to_thread.run_sync(decode_decided_entries, payload or pack([]))
            for block, commit, training in entries:
                if block.header.height != self.voting.height:
                    break
                await trio.to_thread.run_sync(self.node.import_decided, block, commit, training)
                moved = True
                height, target = block.header.height, max(self._heads.get(peer, (0.0, 0))[1], block.header.height)
                self.node.metrics.sync_blocks_fetched.inc()
                fields = {"height": height, "hash": block.hash.hex(), "peer": str(peer), "target": target}
                log.info("synced decided height %d from %s", height, peer, extra=fields)
                self._catch_up.imported(height, target)
        except (DecodeError, InvalidBlock) as error:
            self._reject(str(peer), "decided blocks", str(error), PENALTY_INVALID)
        except StorageError as error:  # the disk failed: the store refuses every later write
            self.fail(f"importing a decided height failed: {error}")
        except Exception as error:
            log.info("sync from %s failed: %s", peer, error)
        finally:
            self.syncing = False
        if moved:
            await self._carry_out(await self._voting_call(self.voting.start, int(time.time())))
            self.decisions.set()
            self.decisions = trio.Event()

    async def _mine_loop(self, key: PrivateKey) -> None:
        """Mine by commit-reveal (docs/spec.md, section 17; p2p/mining.py). A trainer task trains
        the local model on the decided head's weights, round after round, each round ending in a
        snapshot of its values. This loop acts on each new decided head D (height h) at once: it
        commits to the snapshot's update for the slice the key is assigned on block h + 1 (if its
        validation gain against D meets the difficulty; else it tries again on the next snapshot),
        then reveals on D the update D carries our commitment to. Committing comes first: D's next
        proposer proposes as soon as it holds a training block, and a commitment that reaches it
        later misses block h + 1. The commitment is gossiped again every COMMITMENT_RESEND_SECONDS
        while height h + 1 is undecided. A decided block that applies our revealed update makes
        the miner count that slice as the chain's."""
        node, genesis = self.node, self.node.genesis
        directory = chunk_directory(node.genesis_path, genesis)
        train_text = await trio.to_thread.run_sync(lambda: load_split(genesis.dataset, directory, "train"))
        miner = Miner(node.chain.weights(node.head().state), node.chain.layout, train_text, self.config.training)
        mining = MiningProgress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._train_loop, key, miner, mining)
            while True:
                head = node.head()
                if head.block.hash != mining.head:
                    self._mining_head_moved(head.block, mining)
                    await self._commit_update(key, mining)
                    await self._reveal_update(key, mining)
                elif mining.snapshot_round != mining.tried_round:
                    await self._commit_update(key, mining)
                await self._republish_commitment(mining)
                await trio.sleep(0.2)

    async def _train_loop(self, key: PrivateKey, miner: Miner, mining: MiningProgress) -> None:
        """Train on the decided head's weights, one round per head, for the slice of our next
        commitment; after each round, snapshot the local model's values for the mining loop. A
        head is trained on only once the mining loop has acted on it: a round's rebase must see
        the slices the head applied from us as ours (`Miner.published`), or it adds our own
        progress to the local model a second time."""
        slices = self.node.genesis.partition.slices
        mining_progress = Progress("mining", "rounds", logger=log, interval=0.0)  # a line per round (per head)
        while True:
            head = self.node.head()
            if not mining.may_train_on(head.block.hash):
                await trio.sleep(0.2)
                continue
            height = head.block.header.height + 1
            slice_id = compute_next_slice(height + (1 if height in mining.committed else 0), slices)
            seed = compute_training_seed(head.block.hash, key.public_key)
            weights = await trio.to_thread.run_sync(self.node.weights_of, head.state)
            for settled_slice, values in mining.settled.take(head.block.header.height):
                miner.published(settled_slice, values)  # now, not before: see SettledValues
            work, trained = await trio.to_thread.run_sync(train_round, miner, weights, slice_id, seed)
            self.node.metrics.on_training_round(trained.tokens, trained.seconds, trained.loss)
            mining_progress.advance(1, tokens_per_second=round(trained.tokens_per_second), loss=trained.loss)
            mining.snapshot = await trio.to_thread.run_sync(miner.snapshot, weights)
            mining.trained_on, mining.steps = head.block.hash, work.steps
            mining.snapshot_round += 1

    def _mining_head_moved(self, head: Block, mining: MiningProgress) -> None:
        """A new decided head: record our updates it applied, drop commitments it did not carry."""
        mining.head, mining.tried_round = head.hash, -1
        height = head.header.height
        for ours, judge in find_applied(mining.revealed, head, self.node.block_at):
            del mining.revealed[ours.hash]
            if isinstance(ours.body, TrainingBody) and isinstance(judge.body, DecidedBody):
                log.info("mining: height %d applied our block %s (slice %d, test gain %s)", judge.header.height,
                         ours.hash.hex()[:16], ours.body.slice_id, judge.body.gain_of(ours.hash))  # fmt: skip
        mining.revealed = {h: b for h, b in mining.revealed.items() if b.header.height > height}
        for offer, judge in find_settled(mining.offered, head, self.node.block_at):
            mining.settled.record(judge.header.height, offer.slice_id, np.frombuffer(offer.weights, dtype="<i2"))
        mining.offered = {h: u for h, u in mining.offered.items() if h >= height}
        for update in [u for u in mining.committed.values() if u.height <= height]:
            if update.height == height and is_carried(head, update):
                continue
            del mining.committed[update.height]
            if update.height == height:
                log.info("mining: height %d decided without our commitment %s; dropped that update", height,
                         update.update_hash.hex()[:16])  # fmt: skip

    async def _commit_update(self, key: PrivateKey, mining: MiningProgress) -> None:
        """Commit to the latest snapshot's values for our slice on the next decided block, unless
        we did already or their validation gain against the head falls short of the difficulty."""
        head = self.node.head()
        height = head.block.header.height + 1
        mining.tried_round = mining.snapshot_round
        if height in mining.committed or mining.snapshot is None:
            return
        slice_id = compute_next_slice(height, self.node.genesis.partition.slices)
        values = mining.snapshot[slice_id]
        update = await trio.to_thread.run_sync(self._locked_prepare, head.block, head.state, key, values, mining.steps)
        mining.offered[height] = update  # committed or not, the height's verdict settles the slice (find_settled)
        if update.expected_gain < head.state.difficulty:
            log.debug("mining: gain %d below difficulty %d for height %d; training on", update.expected_gain,
                      head.state.difficulty, height)  # fmt: skip
            return
        try:
            await self.publish_commitment(update.commitment)
        except (StaleBlock, UnknownParent):
            return  # decided on meanwhile: the next head gets a commitment of its own
        mining.committed[height] = update
        mining.published_at = trio.current_time()
        log.info("mining: committed update %s for height %d (slice %d, gain %d against height %d)",
                 update.update_hash.hex()[:16], height, update.slice_id, update.expected_gain,
                 head.block.header.height)  # fmt: skip

    async def _reveal_update(self, key: PrivateKey, mining: MiningProgress) -> None:
        """Reveal on the head the update it carries our commitment to, as a training block with
        exactly the committed weights; one whose validation gain falls short is invalid: dropped."""
        head = self.node.head()
        update = mining.committed.get(head.block.header.height)
        if update is None or not is_carried(head.block, update):
            return
        del mining.committed[update.height]
        timestamp = max(int(time.time()), head.block.header.timestamp + 1)
        block = await trio.to_thread.run_sync(self._locked_reveal, head.block, head.state, key, update, timestamp)
        gain = validation_gain(block)
        if gain < head.state.difficulty:
            log.info("mining: revealed update %s on height %d gains %d, below difficulty %d: dropped",
                     update.update_hash.hex()[:16], update.height, gain, head.state.difficulty)  # fmt: skip
            return
        try:
            await self.publish_training_block(block)
        except (StaleBlock, UnknownParent):
            return
        mining.revealed[block.hash] = block
        log.info("mining: revealed training block %s on height %d (update %s, slice %d, gain %d)",
                 block.hash.hex()[:16], update.height, update.update_hash.hex()[:16], update.slice_id,
                 gain)  # fmt: skip

    async def _republish_commitment(self, mining: MiningProgress) -> None:
        """Gossip our commitment for the height being decided again (gossip may have missed a peer)."""
        update = mining.committed.get(self.node.head().block.header.height + 1)
        if update is None or trio.current_time() - mining.published_at < COMMITMENT_RESEND_SECONDS:
            return
        mining.published_at = trio.current_time()
        try:
            await self.publish_commitment(update.commitment)
        except (StaleBlock, UnknownParent):
            return  # decided meanwhile

    def _locked_prepare(
        self, head: Block, state: State, key: PrivateKey, values: np.ndarray, steps: int
    ) -> PreparedUpdate:
        with self.node.lock:
            return prepare_update(self.node.chain, head, state, key, values, steps)

    def _locked_reveal(
        self, parent: Block, state: State, key: PrivateKey, update: PreparedUpdate, timestamp: int
    ) -> Block:
        with self.node.lock:
            return reveal_update(self.node.chain, parent, state, key, update, timestamp)

    async def _resend_loop(self) -> None:
        """Gossip our latest messages again every few seconds: a peer that restarted, or
        missed them while its connections formed, counts them then (it ignores repeats)."""
        while True:
            await trio.sleep(RESEND_INTERVAL)
            await self._carry_out(await self._voting_call(self.voting.resend))

    async def _peers_loop(self) -> None:
        """Track connections, drop banned and blocked peers and those beyond `max_peers`
        (lowest score first, bootstrap peers kept), lift expired bans, re-dial bootstrap peers."""
        assert self.host is not None and self.pubsub is not None
        known: set[str] = set()
        blacklisted: set[str] = set()
        while True:
            banned = self.peers.banned()
            for name in blacklisted - banned:  # the ban expired
                self.pubsub.remove_from_blacklist(ID.from_base58(name))
            for name in banned - blacklisted:
                self.pubsub.add_to_blacklist(ID.from_base58(name))
            blacklisted = banned
            connected = {str(peer): peer for peer in self.host.get_connected_peers()}
            excess = len(connected) - self.config.max_peers
            if excess > 0:
                protected = {address.rsplit("/p2p/", 1)[-1] for address in self.config.bootstrap}
                droppable = sorted((n for n in connected if n not in protected), key=self.peers.score)
                for name in droppable[:excess]:
                    log.info("peer %s dropped: over the limit of %d peers", name, self.config.max_peers,
                             extra={"peer": name, "reason": "over the peer limit"})  # fmt: skip
                    await self._disconnect(connected.pop(name))
            for name, peer in connected.items():
                if self.peers.is_banned(name) or name in self.blocked:
                    await self._disconnect(peer)
                    continue
                if name not in known:
                    try:
                        addresses = [str(a) for a in self.host.get_peerstore().addrs(peer)]
                    except Exception:
                        addresses = []
                    self.peers.on_connected(name, addresses)
                    log.info("peer connected %s", name, extra={"peer": name, "addresses": addresses})
            for name in known - set(connected):
                self.peers.on_disconnected(name)
                log.info("peer disconnected %s", name, extra={"peer": name})
            known = {name for name in connected if not self.peers.is_banned(name) and name not in self.blocked}
            self.node.metrics.on_peers({name: self.peers.score(name) for name in known}, len(banned))
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
        name = str(info.peer_id)
        if name in connected or self.peers.is_banned(name) or name in self.blocked:
            return
        try:
            with trio.fail_after(5):
                await self.host.connect(info)
        except Exception as error:
            log.debug("dial %s failed: %s", address, error)
            network: Any = self.host.get_network()
            cache = getattr(network, "_negative_peer_cache", None)
            if isinstance(cache, dict):  # dial again next time, not after py-libp2p's back-off
                cache.pop(info.peer_id, None)
