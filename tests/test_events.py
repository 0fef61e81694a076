"""The event stream and the history pages on a real decided node and RPC server:
events of a decided height in order, topic filtering, resuming by event id, bad
requests, a subscriber that reads nothing does not hold up the node, the client
reconnects when the stream drops; a voting node streams its votes before the
height they decide; and the block and loss pages match the stored blocks."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from chain.blocks import Block, DecidedBody, TrainingBody, compute_update_hash
from genesis import DEVNET
from node import validator_keys
from p2p.backend import NetworkBackend
from p2p.decided_node import DecidedNode
from p2p.events import ATTESTATION, TOPICS, EventPublisher, TooManySubscribers
from p2p.rpc import LocalBackend, RpcLimits, RpcServer
from p2p.rpc_client import EventStream, HeadWatch, ServerEvent
from p2p.voting_node import VotingNode, VotingNodeConfig
from tests.chain_builders import Scenario, decide_next
from tests.test_rpc import conform
from training.tables import LOSS_BITS

KEEP_ALIVE_SECONDS = 0.5


@dataclass
class Net:
    """A decided node served over HTTP: height 1 applies a training block, height 2 names none;
    the tests decide more heights as they go."""

    scenario: Scenario
    node: DecidedNode
    server: RpcServer
    url: str
    openapi: dict[str, Any]

    def decide(self, with_training: bool) -> tuple[Block, Block | None]:
        """Decide the next height (naming a fresh training block, or none): (the block, the training block)."""
        head = self.node.head()
        training = None
        if with_training:
            training = self.scenario.valid_training_block(head.block, head.state)
            assert self.node.on_training_block(training)
        keys = self.scenario.validators
        height = head.block.header.height + 1
        return decide_next(self.node, keys[height % 4], keys[:3], training), training


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    datadir = tmp_path_factory.mktemp("events")
    scenario = Scenario.create(datadir / "builder")
    node = DecidedNode(DEVNET, datadir / "node")
    server = RpcServer(LocalBackend(node), token="token", limits=RpcLimits(keep_alive_seconds=KEEP_ALIVE_SECONDS))
    url = f"http://127.0.0.1:{server.start()}"
    with urllib.request.urlopen(url + "/openapi.json", timeout=30) as response:
        document = json.loads(response.read())
    net = Net(scenario, node, server, url, document)
    net.decide(with_training=True)
    net.decide(with_training=False)
    yield net
    server.stop()
    node.close()
    scenario.node.close()


def get(net: Net, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(net.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def events_until(stream: EventStream, done: Any, timeout: float = 30) -> list[ServerEvent]:
    """Events from `stream` until `done(events)` holds."""
    events: list[ServerEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, [(e.topic, e.data) for e in events]
        events += stream.wait(0.5)
    return events


def check_event(net: Net, event: ServerEvent) -> None:
    """An event as the OpenAPI document describes it."""
    conform(event.data, {"$ref": f"#/components/schemas/{event.topic.capitalize()}Event"}, net.openapi)


# --- The publisher ---------------------------------------------------------------------


def test_a_full_queue_loses_events_as_one_gap_and_a_resume_replays_what_was_missed() -> None:
    publisher = EventPublisher(max_subscribers=2, queue_events=3, history_events=4)
    woken: list[int] = []
    heads, start = publisher.subscribe(["head"], lambda: woken.append(1))
    assert start == publisher.last_id
    ids = [publisher.publish("head", {"height": height}).id for height in range(1, 7)]
    publisher.publish("block", {"height": 7})  # another topic: neither queued nor a loss
    assert ids == list(range(start + 1, start + 7)) and len(woken) == 6
    taken = publisher.take(heads)
    assert [e.data for e in taken[:3]] == [{"height": 1}, {"height": 2}, {"height": 3}]
    assert taken[3].topic == "gap" and taken[3].data == {"first": ids[3], "last": ids[5]}
    assert publisher.take(heads) == []
    publisher.subscribe(TOPICS, lambda: None)
    with pytest.raises(TooManySubscribers):
        publisher.subscribe(TOPICS, lambda: None)
    publisher.unsubscribe(heads)
    # The history holds the last 4 events (ids[3:], then the block): a resume from ids[4] gets the
    # rest of its topics; one from ids[1] also learns that ids[2] is gone.
    resumed, _ = publisher.subscribe(["head"], lambda: None, last_id=ids[4])
    assert [e.id for e in publisher.take(resumed)] == [ids[5]]
    publisher.unsubscribe(resumed)
    resumed, _ = publisher.subscribe(["head", "block"], lambda: None, last_id=ids[1])
    replayed = publisher.take(resumed)
    assert replayed[0].topic == "gap" and replayed[0].data == {"first": ids[2], "last": ids[2]}
    assert [e.id for e in replayed[1:]] == [*ids[3:], ids[5] + 1]
    with pytest.raises(ValueError, match="event topic"):
        publisher.publish("weather", {})


# --- The stream ---------------------------------------------------------------------------


def test_the_events_of_a_decided_height_arrive_in_order(net: Net) -> None:
    with EventStream(net.url, TOPICS) as stream:
        first = events_until(stream, lambda events: events)
        assert first[0].topic == "subscribed"
        head = net.node.head().block
        assert first[0].data == {"topics": list(TOPICS), "height": head.header.height, "hash": head.hash.hex()}
        block, training = net.decide(with_training=True)
        assert training is not None and isinstance(block.body, DecidedBody)
        events = events_until(stream, lambda events: any(e.topic == "finalized" for e in events))
    assert [e.topic for e in events] == ["block", "block", "head", "finalized"]
    ids = [e.id or 0 for e in events]
    assert 0 not in ids and ids == sorted(set(ids)), ids
    kept, decided, new_head, final = (e.data for e in events)
    assert kept == {"hash": training.hash.hex(), "kind": "training", "height": block.header.height,
                    "proposer": training.header.proposer.hex()}  # fmt: skip
    assert decided == {"hash": block.hash.hex(), "kind": "decided", "height": block.header.height,
                       "proposer": block.header.proposer.hex()}  # fmt: skip
    commit = net.node.commit_of(block.hash)
    assert commit is not None
    applied = [h.hex() for h in block.body.applied]
    assert new_head == {"height": block.header.height, "hash": block.hash.hex(), "round": commit.round,
                        "applied": applied, "timestamp": block.header.timestamp}  # fmt: skip
    assert final == {"height": block.header.height, "hash": block.hash.hex()}
    for event in [*first, *events]:
        check_event(net, event)


def test_a_stream_sends_only_its_topics_and_keep_alive_comments(net: Net) -> None:
    with socket.create_connection(("127.0.0.1", net.server.port), timeout=10) as connection:
        connection.sendall(b"GET /v1/events?topics=finalized HTTP/1.1\r\nHost: x\r\n\r\n")
        received = read_until(connection, b"event: subscribed")
        assert b"200 OK" in received and b"content-type: text/event-stream" in received.lower()
        received += read_until(connection, b": keep-alive\n\n", timeout=KEEP_ALIVE_SECONDS * 4)
        block, _ = net.decide(with_training=False)
        received += read_until(connection, b"event: finalized")
    assert b"event: head" not in received and b"event: block" not in received
    assert f'"hash":"{block.hash.hex()}"'.encode() in received


def read_until(connection: socket.socket, marker: bytes, timeout: float = 30) -> bytes:
    received = b""
    deadline = time.monotonic() + timeout
    while marker not in received:
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = connection.recv(1 << 16)
        assert chunk, received
        received += chunk
    return received


@pytest.mark.parametrize(
    ("query", "headers", "reason"),
    [
        ("?topics=head,weather", {}, "topics: unknown topic 'weather'"),
        ("?topics=", {}, "topics: unknown topic ''"),
        ("?topics=head,", {}, "topics: unknown topic ''"),
        ("", {"Last-Event-ID": "twelve"}, "Last-Event-ID: 'twelve' is not an event id"),
    ],
)
def test_bad_event_requests_are_400_with_the_reason(net: Net, query: str, headers: dict[str, str], reason: str) -> None:
    status, body = get(net, "/v1/events" + query, headers)
    assert status == 400 and body["error"].startswith(reason), body


def test_a_stream_resumes_from_the_last_event_id(net: Net) -> None:
    seen = net.node.events.last_id
    block, _ = net.decide(with_training=False)
    request = urllib.request.Request(net.url + "/v1/events?topics=head", headers={"Last-Event-ID": str(seen)})
    with urllib.request.urlopen(request, timeout=30) as response:
        lines = [response.readline() for _ in range(8)]  # subscribed, then the missed head event
    assert lines[1] == b"event: subscribed\n" and lines[0] == f"id: {net.node.events.last_id}\n".encode()
    assert lines[5] == b"event: head\n" and json.loads(lines[6].removeprefix(b"data: "))["hash"] == block.hash.hex()


def test_past_the_subscriber_limit_a_stream_is_503(net: Net) -> None:
    publisher = net.node.events
    limit = publisher.max_subscribers
    publisher.max_subscribers = publisher.subscribers
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(net.url + "/v1/events", timeout=30)
        with refused.value as error:
            assert error.code == 503 and error.headers["Retry-After"] == "1"
            assert "event subscribers" in json.loads(error.read())["error"]
    finally:
        publisher.max_subscribers = limit


def test_a_client_that_closes_its_stream_frees_its_subscription_at_once(net: Net) -> None:
    server = RpcServer(LocalBackend(net.node), token="t")  # keep-alive comments every 15 s
    before = net.node.events.subscribers
    try:
        with socket.create_connection(("127.0.0.1", server.start()), timeout=10) as connection:
            connection.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            read_until(connection, b"event: subscribed")
            assert net.node.events.subscribers == before + 1
        deadline = time.monotonic() + 2  # long before a keep-alive would find the connection gone
        while net.node.events.subscribers > before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.stop()


def test_streams_do_not_hold_requests_in_flight(net: Net) -> None:
    server = RpcServer(LocalBackend(net.node), token="t", limits=RpcLimits(max_in_flight=1))
    url = f"http://127.0.0.1:{server.start()}"
    try:
        with EventStream(url, ["head"]) as first, EventStream(url, ["block"]) as second:
            events_until(first, lambda events: events)
            events_until(second, lambda events: events)
            with urllib.request.urlopen(url + "/v1/peers", timeout=30) as response:
                assert response.status == 200 and json.loads(response.read()) == {"peers": []}
    finally:
        server.stop()


def kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to (Linux: tcp_wmem's third field)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


def test_a_subscriber_that_reads_nothing_does_not_hold_up_the_node(net: Net) -> None:
    """A stream's client stops reading: the node publishes and decides on at once, a reading
    subscriber gets the decision, and the stalled one, when it reads again, finds a gap."""
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", net.server.port))
    stalled.sendall(b"GET /v1/events?topics=attestation HTTP/1.1\r\nHost: x\r\n\r\n")
    read_until(stalled, b"event: subscribed")
    with stalled, EventStream(net.url, ["finalized"]) as reading:
        events_until(reading, lambda events: events)  # subscribed
        started = time.monotonic()
        vote = {"height": 9, "round": 0, "kind": "prevote", "validator": "ab" * 32, "block": "cd" * 32}
        # More than the kernel can buffer on the way (the server's send buffer grows up to
        # tcp_wmem's maximum, 4 MiB here), so the stalled subscriber's queue must overflow.
        burst = 4 * net.node.events.queue_events + 2 * kernel_send_buffer_max() // len(json.dumps(vote))
        for _ in range(burst):
            net.node.events.publish(ATTESTATION, vote)
        block, _ = net.decide(with_training=False)
        assert time.monotonic() - started < 10
        finalized = events_until(reading, lambda events: events, timeout=10)
        assert finalized[0].data == {"height": block.header.height, "hash": block.hash.hex()}
        assert b"event: gap" in read_until(stalled, b"event: gap")


def test_the_client_reconnects_when_the_stream_drops(net: Net, tmp_path: Path) -> None:
    """A server that stops ends its streams; the client reconnects, resuming from the last id."""
    server = RpcServer(LocalBackend(net.node), token="t", limits=RpcLimits(keep_alive_seconds=KEEP_ALIVE_SECONDS))
    port = server.start()
    with EventStream(f"http://127.0.0.1:{port}", ["head"], retry_seconds=0.2) as stream:
        events_until(stream, lambda events: events)
        assert stream.connected
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 4  # the stream ended with the server
        deadline = time.monotonic() + 10
        while stream.connected:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen = stream.last_id
        block, _ = net.decide(with_training=False)
        again = RpcServer(LocalBackend(net.node), token="t", port=port)
        again.start()
        try:
            events = events_until(stream, lambda events: any(e.topic == "head" for e in events))
        finally:
            again.stop()
    assert stream.last_id is not None and seen is not None and stream.last_id > seen
    assert [e.topic for e in events] == ["subscribed", "head"] and events[1].data["hash"] == block.hash.hex()


def test_a_head_watch_wakes_on_any_node_s_decision_and_follows_the_urls_given(net: Net) -> None:
    """The devnet's and the simulation's waits: streams to several nodes, woken by any head."""
    other = RpcServer(LocalBackend(net.node), token="t")
    urls = [net.url, f"http://127.0.0.1:{other.start()}"]
    try:
        with HeadWatch() as heads:
            assert not heads.connected and not heads.wait(0.1)  # nothing watched: a waiter polls
            heads.watch(urls)
            deadline = time.monotonic() + 10
            while not heads.connected:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            heads.wait(5)  # the streams' subscribed events
            assert not heads.wait(0.2)
            started = time.monotonic()
            net.decide(with_training=False)
            assert heads.wait(10) and time.monotonic() - started < 5
            heads.watch(urls[:1])  # the other node went away (a restarted node has another url)
            other.stop()
            assert heads.connected
    finally:
        other.stop()


def test_a_voting_node_streams_its_votes_before_the_height_they_decide(tmp_path: Path) -> None:
    store = DecidedNode(DEVNET, tmp_path / "node")
    keys = validator_keys(store.genesis)
    network = VotingNode(store, VotingNodeConfig(validator_keys=keys, proposal_wait_seconds=0.1))
    server = RpcServer(NetworkBackend(network), token="t", limits=RpcLimits(keep_alive_seconds=KEEP_ALIVE_SECONDS))
    url = f"http://127.0.0.1:{server.start()}"
    stream = EventStream(url, ["head", "attestation"]).start()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(network.run)
            with trio.fail_after(120):
                while store.head().block.header.height < 2:
                    await trio.sleep(0.1)
            network.stop()

    try:
        events_until(stream, lambda events: events)  # subscribed: the stream is open before the node starts
        trio.run(main)
        events = events_until(stream, lambda events: sum(e.topic == "head" for e in events) >= 2)
        decided = [store.block_at(height) for height in (1, 2)]
    finally:
        stream.close()
        server.stop()
        store.close()
    stakes = {key.public_key.hex() for key in keys}
    for height, block in enumerate(decided, start=1):
        assert block is not None
        head = next(i for i, e in enumerate(events) if e.topic == "head" and e.data["height"] == height)
        before = [e.data for e in events[:head] if e.topic == "attestation" and e.data["height"] == height]
        assert any(a["kind"] == "proposal" and a["block"] == block.hash.hex() for a in before), before
        precommits = {a["validator"] for a in before if a["kind"] == "precommit" and a["block"] == block.hash.hex()}
        assert len(precommits) >= 3 and precommits <= stakes, before  # a quorum of the four equal stakes
        attested = [e.data for e in events if e.topic == "attestation"]
        assert len(attested) == len({json.dumps(a, sort_keys=True) for a in attested})  # each once


# --- History -------------------------------------------------------------------------------


def expected_summary(node: DecidedNode, height: int) -> dict[str, Any]:
    """A block summary computed here from the stored blocks."""
    block, parent = node.block_at(height), node.block_at(height - 1)
    assert block is not None and parent is not None and isinstance(block.body, DecidedBody)
    commit = node.commit_of(block.hash)
    assert commit is not None
    commitments = {(c.miner, c.update_hash) for c in getattr(parent.body, "commitments", ())}
    training = []
    for verdict in block.body.training:
        named = node.stored_block(verdict.training_block)
        assert named is not None and isinstance(named.body, TrainingBody)
        update = compute_update_hash(named.header.proposer, named.body.slice_id, named.body.weights)
        assert block.body.test is not None
        training.append({
            "hash": named.hash.hex(), "miner": named.header.proposer.hex(),
            "committed": (named.header.proposer, update) in commitments,
            "validation_gain": named.body.loss_before - named.body.loss_after,
            "test_gain": block.body.test.loss_before - verdict.loss_after,
            "applied": named.hash in block.body.applied,
        })  # fmt: skip
    return {"height": height, "hash": block.hash.hex(), "timestamp": block.header.timestamp,
            "proposer": block.header.proposer.hex(), "round": commit.round,
            "applied": [h.hex() for h in block.body.applied], "training": training}  # fmt: skip


def test_the_block_pages_match_the_stored_blocks(net: Net) -> None:
    head = net.node.head().block.header.height
    status, page = get(net, "/v1/blocks")
    assert status == 200
    conform(page, {"$ref": "#/components/schemas/BlockPage"}, net.openapi)
    assert page == {"blocks": [expected_summary(net.node, h) for h in range(head, 0, -1)], "next": None}
    assert any(t["applied"] and t["test_gain"] > 0 for b in page["blocks"] for t in b["training"])
    pages: list[dict[str, Any]] = []
    start: int | None = head
    while start is not None:  # two at a time, following next
        status, part = get(net, f"/v1/blocks?from={start}&limit=2")
        pages += part["blocks"]
        start = part["next"]
    assert pages == page["blocks"]
    assert get(net, "/v1/blocks?from=1&limit=100") == (200, {"blocks": [expected_summary(net.node, 1)], "next": None})
    assert get(net, f"/v1/blocks?from={head}&limit=1")[1]["next"] == head - 1
    assert get(net, f"/v1/blocks?from={head + 1}") == (200, {"blocks": [], "next": None})
    assert get(net, f"/v1/blocks?from={'9' * 30}") == (200, {"blocks": [], "next": None})


def test_the_loss_history_matches_the_stored_blocks(net: Net) -> None:
    node = net.node
    head = node.head().block.header.height
    status, history = get(net, "/v1/history/loss")
    assert status == 200 and history["next"] is None
    conform(history, {"$ref": "#/components/schemas/LossHistory"}, net.openapi)
    assert [h["height"] for h in history["heights"]] == list(range(1, head + 1))
    context = node.genesis.model.context
    validation_tokens = node.genesis.evaluation.validation_sequences * context
    confirmed_heights = 0
    for entry in history["heights"]:
        block = node.block_at(entry["height"])
        assert block is not None and isinstance(block.body, DecidedBody) and entry["hash"] == block.hash.hex()
        test = block.body.test
        if test is None:
            assert entry["test_loss_before"] is None and entry["test_loss_after"] is None
            assert entry["confirmed"] == entry["rejected"] == [] and entry["validation_loss_before"] is None
            continue
        tokens = len(test.sequences) * context
        assert entry["test_loss_before"] == pytest.approx(test.loss_before / tokens / (1 << LOSS_BITS), abs=1e-6)
        assert entry["test_loss_after"] == pytest.approx(test.loss_after / tokens / (1 << LOSS_BITS), abs=1e-6)
        assert entry["applied"] == [h.hex() for h in block.body.applied]
        if not block.body.applied:
            assert entry["test_loss_after"] == entry["test_loss_before"] and entry["confirmed"] == []
            continue
        confirmed_heights += 1
        applied = node.stored_block(block.body.applied[0])  # the best-ranked: the validation losses are its proof's
        assert applied is not None and isinstance(applied.body, TrainingBody)
        assert entry["test_loss_after"] < entry["test_loss_before"]  # confirmed updates gain out of sample
        assert [u["hash"] for u in entry["confirmed"]] == entry["applied"]
        named = {u["hash"] for u in entry["confirmed"] + entry["rejected"]}
        assert named == {v.training_block.hex() for v in block.body.training}
        for name in ("loss_before", "loss_after"):
            want = getattr(applied.body, name) / validation_tokens / (1 << LOSS_BITS)
            assert entry[f"validation_{name}"] == pytest.approx(want, abs=1e-6)
            assert entry["confirmed"][0][f"validation_{name}"] == entry[f"validation_{name}"]
        assert entry["confirmed"][0]["slice_id"] == applied.body.slice_id
    assert confirmed_heights >= 1  # height 1 applies an update (and so does the in-order test's, if run)
    assert get(net, "/v1/history/loss?from=1&limit=1") == (200, {"heights": [history["heights"][0]], "next": 2})
    assert get(net, f"/v1/history/loss?from={head}") == (200, {"heights": [history["heights"][-1]], "next": None})
    assert get(net, f"/v1/history/loss?from={head + 1}&limit=5") == (200, {"heights": [], "next": None})


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/v1/blocks?from=0", "from: 0 is genesis"),
        ("/v1/blocks?from=-1", "from: '-1' is not a non-negative decimal integer"),
        ("/v1/blocks?from=top", "from: 'top' is not a non-negative decimal integer"),
        ("/v1/blocks?limit=0", "limit: got 0, want 1 to 100"),
        ("/v1/blocks?limit=101", "limit: got 101, want 1 to 100"),
        ("/v1/blocks?limit=", "limit: '' is not a non-negative decimal integer"),
        ("/v1/history/loss?limit=1001", "limit: got 1001, want 1 to 1000"),
        ("/v1/history/loss?from=0", "from: 0 is genesis"),
        ("/v1/history/loss?from=1.5", "from: '1.5' is not a non-negative decimal integer"),
    ],
)
def test_bad_pages_are_400_with_the_reason(net: Net, path: str, reason: str) -> None:
    status, body = get(net, path)
    assert status == 400 and body["error"].startswith(reason), body


def test_the_event_and_history_routes_are_documented(net: Net) -> None:
    paths = net.openapi["paths"]
    assert {"/v1/events", "/v1/blocks", "/v1/history/loss"} <= set(paths)
    assert "text/event-stream" in paths["/v1/events"]["get"]["responses"]["200"]["content"]


def test_a_page_reads_a_bounded_number_of_heights_from_the_store(net: Net) -> None:
    """A page reads at most `reads_per_page` uncached heights (a testnet height's first read decodes
    up to four 6.4 MB slices): it is cut short there and `next` names the first height it did not read."""
    from p2p.history import History

    while net.node.head().block.header.height < 5:
        net.decide(with_training=False)
    head = net.node.head().block.header.height
    history = History(net.node, reads_per_page=2)
    first = history.losses(1, 1000)
    assert [h["height"] for h in first["heights"]] == [1, 2] and first["next"] == 3
    again = history.losses(1, 1000)  # heights 1 and 2 are cached now: two more are read
    assert [h["height"] for h in again["heights"]] == [1, 2, 3, 4] and again["next"] == 5
    newest = History(net.node, reads_per_page=2).blocks(None, 100)
    assert [b["height"] for b in newest["blocks"]] == [head, head - 1] and newest["next"] == head - 2
    whole = History(net.node).losses(1, 1000)
    pages, start = [], 1
    paged = History(net.node, reads_per_page=2)
    while start is not None:
        part = paged.losses(start, 1000)
        pages += part["heights"]
        start = part["next"]
    assert pages == whole["heights"]
