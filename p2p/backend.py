"""The RPC's view of a networked node (p2p/rpc.py serves it)."""

from __future__ import annotations

from p2p.full_node import ImportResult
from p2p.service import NetworkNode


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
