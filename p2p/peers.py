"""What a node knows of its peers: scores, bans and budgets.

A peer's score starts at 0, falls with every fault it commits (more for one
that breaks a consensus rule than for one that does not decode) and decays
back toward 0 with a half-life of `SCORE_HALF_LIFE_SECONDS` (from a minute
after its latest penalty), so an honest
peer's rare mishap is forgotten and a hostile peer must keep paying. At
`BAN_SCORE` or below the peer is banned for `BAN_SECONDS`: disconnected,
its gossip dropped before it is read, its sync requests refused and its
address not dialed (docs/spec.md, section 13).

Budgets bound what any one peer, and all unknown peers together, can make
this node do (token buckets, refilled continuously):

- **verifications**: a training block costs a full canonical evaluation to
  check. A peer that has relayed a valid training block before may have
  `VERIFY_BURST` checked at once and one more every `1 / VERIFY_RATE`
  seconds; peers that have not (fresh identities cost nothing to make)
  share one smaller budget, `NEWCOMER_BURST` and `NEWCOMER_RATE`. An
  announcement over budget is dropped unread (no fault: the block reaches
  this node again from another relay).
- **sync requests**: `REQUEST_BURST` requests and `REQUEST_RATE` a second
  per peer, at most `MAX_STREAMS_PER_PEER` answered at once; bytes served,
  `BYTES_BURST` and `BYTES_RATE` a second per peer. A request over budget
  is answered "busy" and costs `PENALTY_FLOOD`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BAN_SCORE = -100.0
BAN_SECONDS = 600.0
SCORE_HALF_LIFE_SECONDS = 300.0
"""A penalty halves every five minutes: an honest peer's occasional fault fades."""
SCORE_GRACE_SECONDS = 60.0
"""Decay starts this long after the latest penalty: penalties close together add up exactly."""

PENALTY_MALFORMED = 20
"""A message that does not decode, or breaks the wire protocol."""
PENALTY_INVALID = 50
"""A well-formed block or voting message that breaks a consensus rule."""
PENALTY_WITHHELD = 25
"""A training block announced and then not served (the announcer must hold what it announces)."""
PENALTY_FLOOD = 5
"""A sync request over the peer's budget."""

VERIFY_BURST, VERIFY_RATE = 8.0, 1.0
"""Training blocks checked for a peer that has relayed a valid one: at once, then per second."""
NEWCOMER_BURST, NEWCOMER_RATE = 4.0, 0.2
"""Training blocks checked for all peers that have not, together: at once, then per second."""
REQUEST_BURST, REQUEST_RATE = 64.0, 16.0
"""Sync requests answered per peer: at once, then per second."""
BYTES_BURST, BYTES_RATE = float(256 << 20), float(16 << 20)
"""Sync bytes served per peer: at once, then per second."""
MAX_STREAMS_PER_PEER = 8
"""Sync requests of one peer answered at the same time."""
MAX_RECORDS = 4096
"""Peers remembered; the oldest unconnected, unbanned ones are forgotten beyond it."""
MAX_PENALTIES_KEPT = 20


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` a second; a taker gets one only if one is there."""

    capacity: float
    """The most tokens it holds (the burst)."""
    rate: float
    """Tokens added per second."""
    tokens: float = -1.0
    """Tokens now (starts full)."""
    updated: float = 0.0
    """When `tokens` was last brought up to date (time.monotonic())."""

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        """Take `amount` tokens if there are that many; whether it did."""
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens, self.updated = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


@dataclass
class PeerRecord:
    """One peer, as this node has seen it."""

    peer_id: str
    score_at_update: float = 0.0
    """The score when last changed (it decays from there; read `PeerBook.score`)."""
    score_updated: float = 0.0
    """When (Unix seconds)."""
    connected: bool = False
    connected_since: float | None = None
    addresses: list[str] = field(default_factory=list)
    banned_until: float = 0.0
    penalties: list[tuple[float, int, str]] = field(default_factory=list)
    """(time, points, reason) of the latest penalties, newest last (at most 20)."""
    head_height: int | None = None
    """The head height its last status reported."""
    valid_blocks: int = 0
    """Training blocks it relayed that checked out: a peer with any is no longer a newcomer."""
    verifications: TokenBucket = field(default_factory=lambda: TokenBucket(VERIFY_BURST, VERIFY_RATE))
    requests: TokenBucket = field(default_factory=lambda: TokenBucket(REQUEST_BURST, REQUEST_RATE))
    bytes_served: TokenBucket = field(default_factory=lambda: TokenBucket(BYTES_BURST, BYTES_RATE))
    open_streams: int = 0
    """Sync requests of this peer being answered now."""
    last_seen: float = 0.0
    """When it last connected or sent something (Unix seconds)."""

    def score_at(self, now: float) -> float:
        """The score at `now`: its last value decayed toward 0 by the half-life."""
        elapsed = max(0.0, now - self.score_updated - SCORE_GRACE_SECONDS)
        return float(self.score_at_update * 0.5 ** (elapsed / SCORE_HALF_LIFE_SECONDS))

    @property
    def score(self) -> float:
        """The score now."""
        return self.score_at(time.time())


class PeerBook:
    """Scores, bans and budgets of every peer seen."""

    def __init__(self) -> None:
        self.peers: dict[str, PeerRecord] = {}
        self.newcomers = TokenBucket(NEWCOMER_BURST, NEWCOMER_RATE)
        """The verification budget all newcomers share."""

    def get(self, peer_id: str) -> PeerRecord:
        record = self.peers.get(peer_id)
        if record is None:
            if len(self.peers) >= MAX_RECORDS:
                self._forget_one()
            record = self.peers[peer_id] = PeerRecord(peer_id, score_updated=time.time())
        record.last_seen = time.time()
        return record

    def _forget_one(self) -> None:
        """Drop the least recently seen record that is neither connected nor banned (nor below 0)."""
        now = time.time()
        forgettable = [
            r for r in self.peers.values() if not r.connected and r.banned_until <= now and self.score(r.peer_id) > -1
        ]
        if forgettable:
            del self.peers[min(forgettable, key=lambda r: r.last_seen).peer_id]

    def score(self, peer_id: str, now: float | None = None) -> float:
        """The peer's score now: its last value decayed toward 0 by the half-life."""
        record = self.peers.get(peer_id)
        return 0.0 if record is None else record.score_at(time.time() if now is None else now)

    def on_connected(self, peer_id: str, addresses: list[str]) -> None:
        record = self.get(peer_id)
        record.connected, record.connected_since = True, time.time()
        record.addresses = addresses or record.addresses

    def on_disconnected(self, peer_id: str) -> None:
        record = self.get(peer_id)
        record.connected, record.connected_since = False, None

    def penalize(self, peer_id: str, points: int, reason: str, now: float | None = None) -> bool:
        """Lower a peer's score; True when that bans it."""
        now = time.time() if now is None else now
        record = self.get(peer_id)
        if points:
            record.score_at_update, record.score_updated = self.score(peer_id, now) - points, now
        record.penalties = [*record.penalties[-(MAX_PENALTIES_KEPT - 1) :], (now, points, reason)]
        if record.score_at_update <= BAN_SCORE and record.banned_until <= now:
            record.banned_until = now + BAN_SECONDS
            return True
        return False

    def is_banned(self, peer_id: str, now: float | None = None) -> bool:
        record = self.peers.get(peer_id)
        return record is not None and record.banned_until > (time.time() if now is None else now)

    def banned(self) -> set[str]:
        """The peers banned now."""
        now = time.time()
        return {r.peer_id for r in self.peers.values() if r.banned_until > now}

    # --- budgets ------------------------------------------------------------------

    def on_valid_block(self, peer_id: str) -> None:
        """The peer relayed a training block that checked out."""
        self.get(peer_id).valid_blocks += 1

    def is_newcomer(self, peer_id: str) -> bool:
        record = self.peers.get(peer_id)
        return record is None or record.valid_blocks == 0

    def take_verification(self, peer_id: str) -> bool:
        """Whether a training block relayed by the peer may be checked now (and spends it)."""
        record = self.get(peer_id)
        if not record.verifications.take():
            return False
        if record.valid_blocks == 0 and not self.newcomers.take():
            record.verifications.tokens += 1  # not spent after all
            return False
        return True

    def take_request(self, peer_id: str) -> bool:
        """Whether a sync request of the peer may be answered now (and spends it)."""
        record = self.get(peer_id)
        return record.open_streams < MAX_STREAMS_PER_PEER and record.requests.take()

    def take_bytes(self, peer_id: str, count: int) -> bool:
        """Whether `count` bytes may be served to the peer now (and spends them)."""
        return self.get(peer_id).bytes_served.take(float(count))

    def view(self) -> list[dict[str, object]]:
        """JSON-ready records, connected peers first."""
        records = sorted(self.peers.values(), key=lambda r: (not r.connected, r.peer_id))
        return [
            {
                "peer_id": r.peer_id,
                "connected": r.connected,
                "connected_since": r.connected_since,
                "addresses": r.addresses,
                "score": round(self.score(r.peer_id), 2),
                "banned": self.is_banned(r.peer_id),
                "head_height": r.head_height,
                "valid_blocks": r.valid_blocks,
                "penalties": [{"time": t, "points": p, "reason": why} for t, p, why in r.penalties],
            }
            for r in records
        ]
