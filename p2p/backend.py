"""The RPC's view of a networked voting node (p2p/rpc.py serves it)."""

from __future__ import annotations

from chain.blocks import Block, UpdateCommitment
from p2p.voting_node import VotingNode


class NetworkBackend:
    """The RPC's backend for a `VotingNode` (called from the RPC's thread pool)."""

    def __init__(self, network: VotingNode) -> None:
        self.network = network
        self.node = network.node

    def peers(self) -> list[dict[str, object]]:
        return self.network.peers.view()

    def is_ready(self) -> bool:
        return self.network.ready

    def is_syncing(self) -> bool:
        return self.network.syncing

    def voting(self) -> dict[str, object]:
        """Read without the node's lock (a worker thread holds it through whole evaluations):
        a snapshot of the machines, each read once; a status may be a step behind."""
        voting = self.network.voting
        height = voting.height
        machines = list(voting.machines.values())
        if not machines:
            return {"height": height, "round": 0, "step": "propose"}
        furthest = max(machines, key=lambda machine: (machine.round, machine.step))
        return {"height": height, "round": furthest.round, "step": furthest.step.name.lower()}

    def submit_block(self, data: bytes) -> tuple[Block, bool]:
        return self.network.submit_training_block(data)

    def submit_commitment(self, data: bytes) -> tuple[UpdateCommitment, bool]:
        return self.network.submit_commitment(data)

    def node_info(self) -> dict[str, object]:
        network = self.network
        return {
            "peer_id": network.peer_id if network.host is not None else None,
            "addresses": network.listen_addresses,
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
