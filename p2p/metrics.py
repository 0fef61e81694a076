"""A node's Prometheus metrics, served at `GET /metrics` (p2p/rpc.py) in the text format.

Every `DecidedNode` holds one `NodeMetrics` with a registry of its own (not
prometheus_client's global one: tests run several nodes in one process). The
node's parts update it as they work; nothing here evaluates a model or reads
the store: the head model's losses come from data a decision already carries
(its held-out test and the applied training block's proof).

The metrics (docs/node.md lists them with their types): the decided head
(`potchain_head_height`, `_finalized_height`, `_finality_lag_seconds`,
`_decision_round`, `_decisions_total`, `_round_duration_seconds`, `_syncing`,
`_difficulty`), the model (`potchain_validation_loss`, `_test_loss`,
`_evaluation_seconds`), peers (`potchain_peers_connected`, `_peers_banned`,
`_peer_score`), gossip and sync traffic (`potchain_gossip_messages_total`,
`_gossip_bytes_total`, `_sync_requests_served_total`, `_sync_blocks_served_total`,
`_sync_requests_sent_total`, `_sync_blocks_fetched_total`), refused messages
(`potchain_rejections_total`) and the miner (`potchain_miner_tokens_per_second`,
`_miner_training_loss`, `_miner_rounds_total`, `_miner_tokens_total`).

Label values are bounded: topics and sync methods are the protocol's, peers are
the connected ones (removed on disconnect), and a rejection's free-text reason
is mapped to a `message` kind (`MESSAGE_KINDS`) and a `reason` code (`REASONS`)
by `rejection_labels`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chain.blocks import DecidedBody, TrainingBody
from chain.state import State
from consensus.decided_chain import Decision
from consensus.genesis import Genesis
from consensus.rules import Chain
from p2p.peers import PENALTY_FLOOD, PENALTY_INVALID, PENALTY_MALFORMED, PENALTY_WITHHELD
from training.tables import LOSS_BITS

TOPICS = ("blocks", "votes", "commitments")
"""Gossip topics by short name (`/potchain/<chain id>/<name>/1`)."""
SYNC_METHODS = ("status", "block", "headers", "blocks", "slice", "chunk", "decided")
"""The sync protocol's methods (p2p/wire.py)."""
MESSAGE_KINDS = (
    "training_block",
    "block_announcement",
    "voting_message",
    "update_commitment",
    "sync_request",
    "decided_blocks",
    "block",
    "candidate",
    "other",
)
"""What a refused message was (the `message` label of `potchain_rejections_total`)."""
REASONS = ("malformed", "invalid", "withheld", "over_budget", "unpenalized")
"""Why it was refused (the `reason` label): it did not decode, broke a rule, was announced and not
served, came over the sender's budget, or was refused at no cost to its sender (relayed, late)."""
_REASON_OF_PENALTY = {
    PENALTY_MALFORMED: "malformed",
    PENALTY_INVALID: "invalid",
    PENALTY_WITHHELD: "withheld",
    PENALTY_FLOOD: "over_budget",
    0: "unpenalized",
}

EVALUATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)
"""Seconds: a devnet evaluation takes tens of milliseconds, a testnet one seconds."""
ROUND_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, math.inf)
"""Seconds: a round lasts from about a second to its timeouts (tens of seconds on the testnet)."""


def topic_label(topic: str) -> str:
    """A gossip topic's short name (`blocks`, `votes`, `commitments`), or "other"."""
    parts = topic.strip("/").split("/")
    name = parts[-2] if len(parts) >= 2 else ""
    return name if name in TOPICS else "other"


def rejection_labels(what: str, points: int) -> tuple[str, str]:
    """The bounded (message, reason) labels of a refused message: `what` names the message (a
    training block's carries its hash, dropped here) and the penalty its sender paid gives the reason."""
    words = what.split(" ")
    for name in ("_".join(words[:2]), words[0]):
        if name in MESSAGE_KINDS:
            return name, _REASON_OF_PENALTY.get(points, "invalid")
    return "other", _REASON_OF_PENALTY.get(points, "invalid")


def loss_per_token(total: int, tokens: int) -> float:
    """A Q.16 loss total over `tokens` tokens, in nats per token (for display only)."""
    return total / tokens / (1 << LOSS_BITS)


@dataclass(frozen=True)
class HeadLosses:
    """The head model's losses as a decision shows them (None where it shows none)."""

    validation: float | None
    """Nats per token on the best-ranked applied training block's validation batch (its proof's loss after)."""
    test: float | None
    """Nats per token on the decided block's held-out test sequences (with the applied updates combined, if any)."""


def head_losses(decision: Decision, genesis: Genesis) -> HeadLosses:
    """The head model's losses from a decision's own data: no evaluation."""
    body = decision.block.body
    if not isinstance(body, DecidedBody):
        return HeadLosses(None, None)
    context = genesis.model.context
    validation = None
    best = body.applied[0] if body.applied else None
    for block in decision.training_blocks:
        if block.hash == best and isinstance(block.body, TrainingBody):
            tokens = genesis.evaluation.validation_sequences * context
            validation = loss_per_token(block.body.loss_after, tokens)
    test = None
    if body.test is not None and body.test.sequences:
        tokens = len(body.test.sequences) * context
        test = loss_per_token(body.test.loss_after, tokens)
    return HeadLosses(validation, test)


class NodeMetrics:
    """One node's metrics and their registry (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.head_height = Gauge("potchain_head_height", "The decided head's height", registry=registry)
        self.finalized_height = Gauge(
            "potchain_finalized_height", "The final height (every decided block is final)", registry=registry
        )
        self.finality_lag = Gauge(
            "potchain_finality_lag_seconds",
            "The latest decision: seconds from its block's timestamp until this node stored it",
            registry=registry,
        )
        self.decision_round = Gauge(
            "potchain_decision_round", "The voting round the latest decision was made in", registry=registry
        )
        self.decisions = Counter(
            "potchain_decisions", "Decided heights stored, by source (voting or sync)", ["source"], registry=registry
        )
        self.round_duration = Histogram(
            "potchain_round_duration_seconds",
            "Voting rounds: seconds from a round's start to the next round or the decision",
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.syncing = Gauge("potchain_syncing", "1 while importing decided blocks from a peer", registry=registry)
        self.difficulty = Gauge(
            "potchain_difficulty", "The validation gain a training block must reach", registry=registry
        )
        self.peers_connected = Gauge("potchain_peers_connected", "Connected peers", registry=registry)
        self.peers_banned = Gauge("potchain_peers_banned", "Peers banned now", registry=registry)
        self.peer_score = Gauge("potchain_peer_score", "A connected peer's score", ["peer"], registry=registry)
        self.gossip_messages = Counter(
            "potchain_gossip_messages",
            "Gossip messages by topic and direction",
            ["topic", "direction"],
            registry=registry,
        )
        self.gossip_bytes = Counter(
            "potchain_gossip_bytes", "Gossip bytes by topic and direction", ["topic", "direction"], registry=registry
        )
        self.sync_requests_served = Counter(
            "potchain_sync_requests_served", "Sync requests answered, by method", ["method"], registry=registry
        )
        self.sync_blocks_served = Counter(
            "potchain_sync_blocks_served", "Decided blocks served to peers", registry=registry
        )
        self.sync_requests_sent = Counter(
            "potchain_sync_requests_sent", "Sync requests sent to peers, by method", ["method"], registry=registry
        )
        self.sync_blocks_fetched = Counter(
            "potchain_sync_blocks_fetched", "Decided blocks imported from peers", registry=registry
        )
        self.rejections = Counter(
            "potchain_rejections", "Messages refused, by kind and reason", ["message", "reason"], registry=registry
        )
        self.evaluation_seconds = Histogram(
            "potchain_evaluation_seconds",
            "Seconds of each canonical evaluation this node ran",
            buckets=EVALUATION_BUCKETS,
            registry=registry,
        )
        self.validation_loss = Gauge(
            "potchain_validation_loss", "The head model's validation loss (nats per token)", registry=registry
        )
        self.test_loss = Gauge(
            "potchain_test_loss", "The head model's held-out test loss (nats per token)", registry=registry
        )
        self.miner_tokens_per_second = Gauge(
            "potchain_miner_tokens_per_second", "The miner's latest training round", registry=registry
        )
        self.miner_training_loss = Gauge(
            "potchain_miner_training_loss", "The miner's mean training loss over its latest round", registry=registry
        )
        self.miner_rounds = Counter("potchain_miner_rounds", "The miner's training rounds", registry=registry)
        self.miner_tokens = Counter("potchain_miner_tokens", "Tokens the miner trained on", registry=registry)
        for gauge in (self.validation_loss, self.test_loss, self.finality_lag, self.miner_training_loss):
            gauge.set(math.nan)  # unknown until a decision (or a training round) shows it
        for topic in TOPICS:
            for direction in ("in", "out"):
                self.gossip_messages.labels(topic, direction)
                self.gossip_bytes.labels(topic, direction)
        for method in SYNC_METHODS:
            self.sync_requests_served.labels(method)
            self.sync_requests_sent.labels(method)
        for source in ("voting", "sync"):
            self.decisions.labels(source)
        self._scored_peers: set[str] = set()
        self._round: tuple[int, int, float] | None = None
        """The voting round being timed: its height, its round and when it started (time.monotonic())."""

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)

    # --- decisions ---------------------------------------------------------------

    def on_head(self, decision: Decision, genesis: Genesis) -> None:
        """A decided head (loaded at start or just stored): heights, difficulty and the losses it shows."""
        height = decision.block.header.height
        self.head_height.set(height)
        self.finalized_height.set(height)
        self.difficulty.set(decision.state.difficulty)
        if decision.commit is not None:
            self.decision_round.set(decision.commit.round)
        losses = head_losses(decision, genesis)
        if losses.validation is not None:
            self.validation_loss.set(losses.validation)
        if losses.test is not None:
            self.test_loss.set(losses.test)

    def on_decided(self, decision: Decision, genesis: Genesis, source: str, now: float | None = None) -> None:
        """A decision was stored (from this node's `voting` or from `sync`)."""
        self.on_head(decision, genesis)
        self.decisions.labels(source).inc()
        now = time.time() if now is None else now
        self.finality_lag.set(max(0.0, now - decision.block.header.timestamp))

    def on_voting(self, height: int, round: int, now: float | None = None) -> None:
        """The voting of `height` reached `round` (its furthest machine's): time the round that ended."""
        now = time.monotonic() if now is None else now
        if self._round is not None and self._round[:2] == (height, round):
            return
        if self._round is not None:
            self.round_duration.observe(now - self._round[2])
        self._round = (height, round, now)

    # --- peers and messages --------------------------------------------------------

    def on_peers(self, scores: dict[str, float], banned: int) -> None:
        """The connected peers' scores now (their labels replace the last call's) and the bans."""
        self.peers_connected.set(len(scores))
        self.peers_banned.set(banned)
        for peer in self._scored_peers - set(scores):
            self.peer_score.remove(peer)
        for peer, score in scores.items():
            self.peer_score.labels(peer).set(score)
        self._scored_peers = set(scores)

    def on_gossip(self, topic: str, direction: str, size: int) -> None:
        """A gossip message on `topic` (its full name) received (`in`) or published (`out`)."""
        label = topic_label(topic)
        self.gossip_messages.labels(label, direction).inc()
        self.gossip_bytes.labels(label, direction).inc(size)

    def on_rejection(self, what: str, points: int) -> None:
        """A message refused (`what` it was, the penalty its sender paid): counted by bounded labels."""
        self.rejections.labels(*rejection_labels(what, points)).inc()

    def on_sync_served(self, method: str) -> None:
        """A sync request answered (a method outside the protocol's is not counted: the label stays bounded)."""
        if method in SYNC_METHODS:
            self.sync_requests_served.labels(method).inc()

    def on_sync_sent(self, method: str) -> None:
        """A sync request sent to a peer."""
        if method in SYNC_METHODS:
            self.sync_requests_sent.labels(method).inc()

    # --- the miner ---------------------------------------------------------------------

    def on_training_round(self, tokens: int, seconds: float, loss: float) -> None:
        """The miner trained a round: `tokens` in `seconds`, at mean training loss `loss`."""
        self.miner_rounds.inc()
        self.miner_tokens.inc(tokens)
        if seconds > 0:
            self.miner_tokens_per_second.set(tokens / seconds)
        self.miner_training_loss.set(loss)


def metric_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry's metrics can expose (a counter `x` as `x_total`, a
    histogram's `_bucket`, `_count` and `_sum`), whether or not a sample exists yet."""
    names: set[str] = set()
    for family in registry.collect():
        names |= sample_names(family.name, family.type)
    return names


def sample_names(name: str, kind: str) -> set[str]:
    """The sample names of a metric family of a given type (as a PromQL query names them)."""
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if kind == "summary":
        return {name, f"{name}_count", f"{name}_sum"}
    return {name}


class MeteredChain(Chain):
    """A `Chain` that reports how long each canonical evaluation took (`on_evaluation`,
    in seconds); an answer served from the chain's memo is not an evaluation."""

    on_evaluation: Callable[[float], None] | None = None

    def loss(self, state: State, split: str, seed: bytes) -> int:
        return self._timed(Chain.loss, state, split, seed)

    def loss_on(self, state: State, sequences: Sequence[bytes]) -> int:
        return self._timed(Chain.loss_on, state, sequences)

    def _timed(self, evaluate: Callable[..., int], *arguments: Any) -> int:
        before, started = self.evaluations, time.perf_counter()
        total = evaluate(self, *arguments)
        if self.on_evaluation is not None and self.evaluations > before:
            self.on_evaluation(time.perf_counter() - started)
        return total
