"""The libp2p host: a persistent node key, TCP with Noise and Yamux, GossipSub.

py-libp2p 0.8.1's defaults drop messages in ways a chain cannot afford;
`configure_libp2p` sets, once per process, what a node needs (each a
measured problem):

- dials wait 250 ms of "happy eyeballs" even for one address: no delay;
- per-peer outbound queues of 32 RPCs and subscription channels of 32
  messages drop bursts silently: 1024 each;
- the `libp2p` logger has no handler: its records go to ours;
- the pubsub stream handler lets a protobuf DecodeError from a malformed
  inbound RPC escape, which stops the Pubsub service and the node (seen in
  the adversarial simulation): such a stream is reset and its peer dropped,
  as the handler already does for the errors it expects; and a message that
  arrives while the Pubsub service shuts down no longer fails the node's
  exit ("Nursery is closed to new arrivals");
- blacklisting a connected peer (how the node enforces a ban) resets its
  pubsub stream and then deletes it from the peer table, which the
  dead-peer handler may already have done meanwhile: the `KeyError` stopped
  the Pubsub service and the node (seen in the hostile-peer tests); the
  entry is now removed only if still there.

GossipSub's own spam protection (10 messages a second per forwarder and
topic, counting our own publishes) is off; the node rate-limits verification
work per peer itself (p2p/peers.py). Heartbeat: 1 s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub

from chain.files import SECRET_MODE, write_atomically

GOSSIPSUB_PROTOCOL = TProtocol("/meshsub/1.1.0")
QUEUE_SIZE = 1024
MAX_RPC_BYTES = 1 << 20
"""Inbound gossip RPC limit: equal to the sender's (py-libp2p splits outbound RPCs at 1 MiB)."""
_configured = False


def configure_libp2p() -> None:
    global _configured
    if _configured:
        return
    import libp2p.network.swarm as swarm
    import libp2p.pubsub.pubsub as pubsub_module
    from libp2p.pubsub.rpc_queue import RpcQueue

    setattr(swarm, "_HAPPY_EYEBALLS_DELAY", 0)  # noqa: B010 - module constants, set on purpose
    setattr(pubsub_module, "SUBSCRIPTION_CHANNEL_SIZE", QUEUE_SIZE)  # noqa: B010
    setattr(pubsub_module, "RpcQueue", functools.partial(RpcQueue, max_size=QUEUE_SIZE))  # noqa: B010
    original_handler = Pubsub.stream_handler

    async def stream_handler(self: Pubsub, stream: Any) -> None:
        try:
            await original_handler(self, stream)
        except DecodeError as error:
            logging.getLogger("potchain.p2p").warning(
                "malformed gossip RPC from %s (%s): stream reset", stream.muxed_conn.peer_id, error
            )
            await stream.reset()
            self._handle_dead_peer(stream.muxed_conn.peer_id)
        except RuntimeError as error:  # a message arriving while the service shuts down
            if "closed to new arrivals" not in str(error):
                raise
            await stream.reset()

    setattr(Pubsub, "stream_handler", stream_handler)  # noqa: B010

    async def teardown_if_connected(self: Pubsub, peer_id: Any) -> None:
        stream = self.peers.get(peer_id)
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.reset()
            self.peers.pop(peer_id, None)
        self._forget_all_subscriptions(peer_id)

    setattr(Pubsub, "_teardown_if_connected", teardown_if_connected)  # noqa: B010
    library_logger = logging.getLogger("libp2p")
    library_logger.propagate = True
    library_logger.setLevel(logging.WARNING)
    _configured = True


def load_or_create_node_key(path: Path) -> KeyPair:
    """The node's libp2p identity: a 32-byte Ed25519 seed kept in `path` (mode 0600).

    Created atomically on first start, so the peer id survives restarts."""
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path}: a node key is 32 bytes, this file has {len(seed)}")
    else:
        seed = secrets.token_bytes(32)
        write_atomically(path, seed, SECRET_MODE)
    return create_new_key_pair(seed)


def make_host(key_pair: KeyPair, max_peers: int = 64) -> IHost:
    """A TCP host with Noise and Yamux (the defaults), identify and ping.

    Connections: at most `max_peers` before py-libp2p prunes (the node drops the
    lowest-scored itself, p2p/voting_node.py), and twice that in all. py-libp2p's
    auto-connector is off (no low watermark): it re-dialed every address in the
    peer store, banned and departed peers included, hundreds at a time, and a
    node full of such dials did not stop within a minute of SIGTERM; the node
    dials its bootstrap peers itself."""
    configure_libp2p()
    limits = ConnectionConfig(
        max_connections=2 * max_peers,
        high_watermark=max_peers,
        low_watermark=0,
        min_connections=0,
    )
    return new_host(key_pair=key_pair, connection_config=limits)


class FloodPublishGossipSub(GossipSub):
    """GossipSub that sends the node's own messages to every peer subscribed to the topic, not
    only to its mesh (go-libp2p's `floodPublish`, on by default there). Relayed messages still
    follow the mesh. Measured: peers without stake that join a node's mesh and relay nothing
    got the two honest nodes of the hostile-peer bench pruned from each other's mesh, and with
    py-libp2p's 60 s prune back-off their votes crossed only by gossip: heights stalled for over
    a minute after the attackers left. A validator's votes reach every peer it is connected to."""

    def _get_peers_to_send(
        self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterator[ID]:
        topics = list(topic_ids)
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and origin == self.pubsub.my_id:
            for topic in topics:
                peers.update(self.pubsub.peer_topics.get(topic, ()))
            peers.discard(origin)
        yield from peers


def make_pubsub(host: IHost) -> tuple[Pubsub, GossipSub]:
    """GossipSub (own messages flooded to every subscribed peer) with strict signing, a 1 s
    heartbeat and the gossip size limit."""
    router = FloodPublishGossipSub(
        [GOSSIPSUB_PROTOCOL],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        spam_protection_enabled=False,
    )
    pubsub = Pubsub(
        host,
        router,
        strict_signing=True,
        max_inbound_rpc_size=MAX_RPC_BYTES,
        validation_timeout=60.0,
    )
    return pubsub, router
