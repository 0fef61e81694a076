"""What a node knows of its peers: scores and bans.

A peer's score starts at 0 and falls with every invalid message it sends
(more for one that breaks a consensus rule than for one that does not
decode); at `BAN_SCORE` or below the peer is disconnected and refused for
`BAN_SECONDS` (docs/spec.md, section 13).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BAN_SCORE = -100
BAN_SECONDS = 600

PENALTY_MALFORMED = 20
"""A message that does not decode, or breaks the wire protocol."""
PENALTY_INVALID = 50
"""A well-formed block or voting message that breaks a consensus rule."""


@dataclass
class PeerRecord:
    """One peer, as this node has seen it."""

    peer_id: str
    score: int = 0
    connected: bool = False
    connected_since: float | None = None
    addresses: list[str] = field(default_factory=list)
    banned_until: float = 0.0
    penalties: list[tuple[float, int, str]] = field(default_factory=list)
    """(time, points, reason) of the latest penalties, newest last (at most 20)."""
    head_height: int | None = None
    """The head height its last status reported."""


class PeerBook:
    """Scores and bans of every peer seen."""

    def __init__(self) -> None:
        self.peers: dict[str, PeerRecord] = {}

    def get(self, peer_id: str) -> PeerRecord:
        if peer_id not in self.peers:
            self.peers[peer_id] = PeerRecord(peer_id)
        return self.peers[peer_id]

    def on_connected(self, peer_id: str, addresses: list[str]) -> None:
        record = self.get(peer_id)
        record.connected, record.connected_since = True, time.time()
        record.addresses = addresses or record.addresses

    def on_disconnected(self, peer_id: str) -> None:
        record = self.get(peer_id)
        record.connected, record.connected_since = False, None

    def penalize(self, peer_id: str, points: int, reason: str) -> bool:
        """Lower a peer's score; True when that bans it."""
        record = self.get(peer_id)
        record.score -= points
        record.penalties = [*record.penalties[-19:], (time.time(), points, reason)]
        if record.score <= BAN_SCORE and not self.is_banned(peer_id):
            record.banned_until = time.time() + BAN_SECONDS
            return True
        return False

    def is_banned(self, peer_id: str) -> bool:
        record = self.peers.get(peer_id)
        return record is not None and record.banned_until > time.time()

    def view(self) -> list[dict[str, object]]:
        """JSON-ready records, connected peers first."""
        records = sorted(self.peers.values(), key=lambda r: (not r.connected, r.peer_id))
        return [
            {
                "peer_id": r.peer_id,
                "connected": r.connected,
                "connected_since": r.connected_since,
                "addresses": r.addresses,
                "score": r.score,
                "banned": self.is_banned(r.peer_id),
                "head_height": r.head_height,
                "penalties": [{"time": t, "points": p, "reason": why} for t, p, why in r.penalties],
            }
            for r in records
        ]
