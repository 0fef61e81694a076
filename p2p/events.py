"""The node's events, for the RPC's server-sent event stream (`GET /v1/events`).

The node publishes from its own threads: the trio thread that runs libp2p and
the voting, and the worker threads that store decisions and keep training
blocks. The RPC's streams read on the RPC's asyncio loop, in another thread.
`EventPublisher` stands between them: `publish` takes a short lock, appends
the event to each subscriber's bounded queue and calls the subscriber's
`wake` (which must not block: the RPC's schedules a wake-up on its loop), so
a subscriber can never hold up the node. A subscriber whose queue is full
loses the events that do not fit; its next `take` reports them as one gap
(the range of event ids it missed), and the stream sends a `gap` event.

Event ids are integers that only grow, also across restarts (the first of a
run is its start time in microseconds), so a client that reconnects with the
last id it saw (`Last-Event-ID`) is sent the events it missed from the
publisher's recent history, or a gap if they are gone.

Topics and their data (docs/node.md):

- `head`: a height was decided: `{"height", "hash", "round", "applied", "timestamp"}`;
- `finalized`: the same block is final (at once, by its commit certificate): `{"height", "hash"}`;
- `block`: a block was stored or kept: a decided block, or a valid training block
  kept on the head: `{"hash", "kind", "height", "proposer"}`;
- `attestation`: a valid proposal, prevote or precommit this node signed or received:
  `{"height", "round", "kind", "validator", "block"}` (`block` null for a nil vote).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from chain.blocks import Block, DecidedBody
from chain.votes import Proposal, Vote, VoteKind

HEAD = "head"
FINALIZED = "finalized"
BLOCK = "block"
ATTESTATION = "attestation"
TOPICS = (HEAD, FINALIZED, BLOCK, ATTESTATION)
"""The topics a client may subscribe to, in the order a decided height publishes the last three."""
GAP = "gap"
"""The event a stream sends in place of events its subscriber lost: `{"first", "last"}`, the range
of event ids it missed (ids of other topics in that range were never meant for it)."""

SUBSCRIBED = "subscribed"
"""The event a stream opens with: `{"topics", "height", "hash"}`, its topics and the head when it
subscribed; its id is the last event's before the subscription (the missed events a resumed stream
sends after it have smaller ids)."""
KEEP_ALIVE = b": keep-alive\n\n"
"""The comment a stream sends when it has had nothing to send for a while."""

CLOSED_CHECK_SECONDS = 0.25
"""How often an idle stream looks whether its client has closed the connection."""

MAX_SUBSCRIBERS = 32
"""Subscribers at once; one more is refused (the RPC answers 503)."""
QUEUE_EVENTS = 256
"""Events waiting for one subscriber; past it, the subscriber loses events (a gap)."""
HISTORY_EVENTS = 1024
"""Recent events kept for clients that reconnect with the last id they saw."""


class TooManySubscribers(Exception):
    """The publisher already serves MAX_SUBSCRIBERS subscribers."""


@dataclass(frozen=True)
class NodeEvent:
    """One event, as a stream sends it."""

    id: int
    """Its id: larger than every earlier event's, in this run and the runs before."""
    topic: str
    """One of TOPICS, or GAP."""
    data: dict[str, Any]
    """Its JSON data (bytes as lowercase hex)."""

    def encode(self) -> bytes:
        """The event in the text/event-stream format: id, event and data lines, then a blank line."""
        data = json.dumps(self.data, separators=(",", ":"))
        return f"id: {self.id}\nevent: {self.topic}\ndata: {data}\n\n".encode()


def gap_event(first: int, last: int) -> NodeEvent:
    """The stand-in for the events with ids first..last that a subscriber lost."""
    return NodeEvent(last, GAP, {"first": first, "last": last})


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue: filled by `EventPublisher.publish`, emptied by `take` (under its lock)."""

    topics: frozenset[str]
    """The topics it receives."""
    wake: Callable[[], None]
    """Called (without blocking) after events were queued for it."""
    queue: deque[NodeEvent] = field(default_factory=deque)
    """Events not yet taken."""
    lost: tuple[int, int] | None = None
    """The first and last id of the events it lost since the last `take` (its queue was full)."""


class EventPublisher:
    """Fans the node's events out to bounded subscriber queues (thread-safe; see the module docstring)."""

    def __init__(
        self,
        max_subscribers: int = MAX_SUBSCRIBERS,
        queue_events: int = QUEUE_EVENTS,
        history_events: int = HISTORY_EVENTS,
    ) -> None:
        for name, value in (("max_subscribers", max_subscribers), ("queue_events", queue_events),
                            ("history_events", history_events)):  # fmt: skip
            if value < 1:
                raise ValueError(f"EventPublisher {name}: got {value}, want at least 1")
        self.max_subscribers = max_subscribers
        self.queue_events = queue_events
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []
        self._history: deque[NodeEvent] = deque(maxlen=history_events)
        self._last_id = time.time_ns() // 1000
        """The last id given out (the first event of this run gets one more)."""

    @property
    def last_id(self) -> int:
        """The id of the last event published (before any: this run's start, in microseconds)."""
        with self._lock:
            return self._last_id

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    def publish(self, topic: str, data: dict[str, Any]) -> NodeEvent:
        """Queue an event for every subscriber of its topic; never blocks on a subscriber."""
        if topic not in TOPICS:
            raise ValueError(f"event topic: got {topic!r}, want one of {', '.join(TOPICS)}")
        woken = []
        with self._lock:
            self._last_id += 1
            event = NodeEvent(self._last_id, topic, data)
            self._history.append(event)
            for subscription in self._subscriptions:
                if topic not in subscription.topics:
                    continue
                if len(subscription.queue) >= self.queue_events:
                    first = event.id if subscription.lost is None else subscription.lost[0]
                    subscription.lost = (first, event.id)
                else:
                    subscription.queue.append(event)
                woken.append(subscription.wake)
        for wake in woken:
            wake()
        return event

    def subscribe(
        self, topics: Iterable[str], wake: Callable[[], None], last_id: int | None = None
    ) -> tuple[Subscription, int]:
        """A new subscriber of `topics`, and the id of the last event published before it. With
        `last_id`, its queue starts with the recent events after that id (of its topics), after a
        gap if some of them are no longer kept. Raises TooManySubscribers."""
        wanted = frozenset(topics)
        if not wanted <= set(TOPICS):
            raise ValueError(f"topics: got {sorted(wanted)}, want some of {', '.join(TOPICS)}")
        with self._lock:
            if len(self._subscriptions) >= self.max_subscribers:
                raise TooManySubscribers(f"{self.max_subscribers} event subscribers, the most this node serves")
            subscription = Subscription(wanted, wake)
            if last_id is not None and last_id < self._last_id:
                kept = [event for event in self._history if event.id > last_id]
                oldest = kept[0].id if kept else self._last_id + 1
                if oldest > last_id + 1:
                    subscription.queue.append(gap_event(last_id + 1, oldest - 1))
                subscription.queue.extend(event for event in kept if event.topic in wanted)
            self._subscriptions.append(subscription)
            return subscription, self._last_id

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def take(self, subscription: Subscription) -> list[NodeEvent]:
        """A subscriber's queued events, oldest first, then a gap for those it lost (if any)."""
        with self._lock:
            events = list(subscription.queue)
            subscription.queue.clear()
            if subscription.lost is not None:
                events.append(gap_event(*subscription.lost))
                subscription.lost = None
            return events


# --- The stream (on the RPC's asyncio loop) ----------------------------------------------


async def stream_events(
    request: web.Request,
    publisher: EventPublisher,
    topics: frozenset[str],
    last_id: int | None,
    head: Callable[[], Block],
    keep_alive_seconds: float,
    stopping: asyncio.Event,
    streams: set[asyncio.Event],
) -> web.StreamResponse:
    """Serve one subscriber as text/event-stream until it goes away or the server stops: the
    `subscribed` event, the events it missed (with `last_id`), then each event as it comes and a
    keep-alive comment after `keep_alive_seconds` without one. Its wake-up event is in `streams`
    while it runs: the server sets `stopping`, then each of them, when it stops. Raises TooManySubscribers before
    anything is sent."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # from the publishing thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: the stream is gone
            loop.call_soon_threadsafe(wake.set)

    subscription, last = publisher.subscribe(topics, notify, last_id)
    streams.add(wake)
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers | {"X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        block = head()
        opening = NodeEvent(last, SUBSCRIBED, {"topics": [t for t in TOPICS if t in topics],
                                               "height": block.header.height, "hash": block.hash.hex()})  # fmt: skip
        await response.write(opening.encode())
        sent = loop.time()
        while not stopping.is_set():
            wake.clear()
            events = publisher.take(subscription)
            if events:
                await response.write(b"".join(event.encode() for event in events))
                sent = loop.time()
                continue
            if request.transport is None or request.transport.is_closing():
                break  # the client closed the connection: its subscription is free at once
            try:
                async with asyncio.timeout(min(keep_alive_seconds, CLOSED_CHECK_SECONDS)):
                    await wake.wait()
            except TimeoutError:
                if loop.time() - sent >= keep_alive_seconds:
                    await response.write(KEEP_ALIVE)
                    sent = loop.time()
    except ConnectionError:  # the client went away
        pass
    finally:
        streams.discard(wake)
        publisher.unsubscribe(subscription)
    return response


# --- Event data ------------------------------------------------------------------------


def block_data(block: Block) -> dict[str, Any]:
    """A `block` event's data."""
    header = block.header
    return {"hash": block.hash.hex(), "kind": header.kind.name.lower(), "height": header.height,
            "proposer": header.proposer.hex()}  # fmt: skip


def head_data(block: Block, round: int) -> dict[str, Any]:
    """A `head` event's data: the decided block, the round its certificate is from, the training
    blocks whose updates it applied (best-ranked first; empty when none)."""
    applied = block.body.applied if isinstance(block.body, DecidedBody) else ()
    return {"height": block.header.height, "hash": block.hash.hex(), "round": round,
            "applied": [h.hex() for h in applied], "timestamp": block.header.timestamp}  # fmt: skip


def finalized_data(block: Block) -> dict[str, Any]:
    """A `finalized` event's data."""
    return {"height": block.header.height, "hash": block.hash.hex()}


def attestation_data(message: Proposal | Vote) -> dict[str, Any]:
    """An `attestation` event's data: who proposed or voted for which block (null: nil) in which round."""
    block: bytes | None
    if isinstance(message, Proposal):
        kind, validator, block = "proposal", message.proposer, message.block_hash
    else:
        kind = "prevote" if message.kind == VoteKind.PREVOTE else "precommit"
        validator, block = message.validator, message.block_hash
    return {"height": message.height, "round": message.round, "kind": kind, "validator": validator.hex(),
            "block": None if block is None else block.hex()}  # fmt: skip
