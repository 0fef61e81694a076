"""The node's metrics, structured logs and progress reports.

`GET /metrics` is Prometheus's text format (parsed here with prometheus_client's
own parser) and moves as a node decides heights: on one decided node over the
RPC, and on two voting nodes over libp2p (gossip, sync, peers and their
scores, voting rounds, a refused message). The head model's losses are the
decided blocks' own numbers. JSON log lines carry records' fields as keys;
`potchain replay` reports its rate and ETA; the sample Grafana dashboard
queries only metrics a node exposes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import node as cli
from chain.blocks import Block, DecidedBody, TrainingBody
from consensus.genesis import Genesis
from genesis import DEVNET
from node import validator_keys
from p2p.backend import NetworkBackend
from p2p.decided_node import DecidedNode
from p2p.logs import CatchUp, JsonFormatter, Progress, TextFormatter, configure_logging
from p2p.metrics import MeteredChain, NodeMetrics, rejection_labels, sample_names
from p2p.rpc import LocalBackend, RpcServer
from p2p.voting_node import VotingNode, VotingNodeConfig, votes_topic
from tests.chain_builders import Scenario, decide_next
from training.tables import LOSS_BITS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, set[str]]:
    """The samples of a /metrics answer by (name, sorted labels), and every sample name its
    families can expose (a counter's `_total`, a histogram's `_bucket`, `_count` and `_sum`)."""
    samples: Samples = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= sample_names(family.name, family.type)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, names


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(url: str) -> tuple[Samples, set[str]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def expected_test_loss(block: Block, genesis: Genesis) -> float:
    """Nats per token of the model after a decided block on its held-out test sequences."""
    body = block.body
    assert isinstance(body, DecidedBody) and body.test is not None
    total = body.test.loss_after  # the applied updates combined (checked by the rules)
    if len(body.applied) <= 1:  # one update alone, or none: its verdict's loss after, or the parent's
        alone = [v.loss_after for v in body.training if v.training_block in body.applied]
        assert total == (alone[0] if alone else body.test.loss_before)
    return total / (len(body.test.sequences) * genesis.model.context) / (1 << LOSS_BITS)


# --- One decided node over the RPC ------------------------------------------------------


@dataclass
class Served:
    node: DecidedNode
    server: RpcServer
    url: str
    training: Block
    first: Block
    second: Block


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A decided node at height 2 (height 1 tests a training block, height 2 none), served over HTTP."""
    datadir = tmp_path_factory.mktemp("metrics")
    scenario = Scenario.create(datadir / "builder")
    node = DecidedNode(DEVNET, datadir / "node")
    keys = scenario.validators
    genesis = node.head()
    training = scenario.valid_training_block(genesis.block, genesis.state)
    assert node.on_training_block(training)
    first = decide_next(node, keys[0], keys[0:3], training)
    second = decide_next(node, keys[1], keys[1:4], None)
    server = RpcServer(LocalBackend(node), token="token")
    url = f"http://127.0.0.1:{server.start()}"
    yield Served(node, server, url, training, first, second)
    server.stop()
    node.close()
    scenario.node.close()


def test_metrics_parse_and_show_the_decided_head_and_its_losses(served: Served, devnet: Genesis) -> None:
    samples, names = scrape(served.url)
    assert value(samples, "potchain_head_height") == 2 == value(samples, "potchain_finalized_height")
    assert value(samples, "potchain_decisions_total", source="sync") == 2  # imported with their certificates
    assert value(samples, "potchain_decisions_total", source="voting") == 0
    assert value(samples, "potchain_decision_round") == 0
    assert value(samples, "potchain_difficulty") == served.node.head().state.difficulty
    assert value(samples, "potchain_syncing") == 0 and value(samples, "potchain_peers_connected") == 0
    assert value(samples, "potchain_finality_lag_seconds") >= 0
    # The head (height 2) tested nothing: the test loss is height 1's, the model unchanged since.
    assert value(samples, "potchain_test_loss") == pytest.approx(expected_test_loss(served.first, devnet))
    body = served.first.body
    assert isinstance(body, DecidedBody) and isinstance(served.training.body, TrainingBody)
    validation = value(samples, "potchain_validation_loss")
    if body.applied == (served.training.hash,):  # the applied block's proof: its loss after, per token
        tokens = devnet.evaluation.validation_sequences * devnet.model.context
        assert validation == pytest.approx(served.training.body.loss_after / tokens / (1 << LOSS_BITS))
    else:
        assert math.isnan(validation)
    # Every canonical evaluation the node ran was timed (memoized answers are not evaluations).
    assert isinstance(served.node.chain, MeteredChain)
    evaluations = value(samples, "potchain_evaluation_seconds_count")
    assert evaluations == served.node.chain.evaluations >= 2
    assert value(samples, "potchain_evaluation_seconds_sum") > 0
    assert {"potchain_gossip_messages_total", "potchain_rejections_total", "potchain_peer_score"} <= names


def test_metrics_move_with_the_next_decision(served: Served) -> None:
    before, _ = scrape(served.url)
    keys = validator_keys(served.node.genesis)
    third = decide_next(served.node, keys[2], keys[0:3], None)
    after, _ = scrape(served.url)
    assert value(after, "potchain_head_height") == third.header.height == value(before, "potchain_head_height") + 1
    assert (
        value(after, "potchain_decisions_total", source="sync")
        == value(before, "potchain_decisions_total", source="sync") + 1
    )


def test_each_node_has_its_own_registry(served: Served) -> None:
    other = NodeMetrics()
    assert other.registry is not served.node.metrics.registry
    samples, _ = parse(other.exposition().decode())
    assert value(samples, "potchain_head_height") == 0 and math.isnan(value(samples, "potchain_test_loss"))


def test_rejection_labels_are_bounded_codes() -> None:
    assert rejection_labels("training block 0123456789abcdef", 50) == ("training_block", "invalid")
    assert rejection_labels("block announcement", 25) == ("block_announcement", "withheld")
    assert rejection_labels("sync request", 5) == ("sync_request", "over_budget")
    assert rejection_labels("voting message", 20) == ("voting_message", "malformed")
    assert rejection_labels("voting message", 0) == ("voting_message", "unpenalized")
    assert rejection_labels("decided blocks", 50) == ("decided_blocks", "invalid")
    assert rejection_labels("something new: height 7", 3) == ("other", "invalid")


# --- Two voting nodes over libp2p -------------------------------------------------------


def height_of(store: DecidedNode) -> int:
    return store.head().block.header.height


def voting_decisions(store: DecidedNode) -> float:
    """The heights the node decided by following the voting (not by sync), from its own metrics."""
    return store.metrics.registry.get_sample_value("potchain_decisions_total", {"source": "voting"}) or 0.0


def has_a_test(block: Block | None) -> bool:
    """A decided block that tests a training block out of sample."""
    return block is not None and isinstance(block.body, DecidedBody) and block.body.test is not None


def test_metrics_move_while_a_network_decides_heights(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node A holds every validator key and decides heights alone, the first testing a training
    block; node B starts later, syncs the heights it missed from A, then follows A's voting. B sends
    A one malformed voting message. Both serve /metrics."""
    caplog.set_level(logging.INFO, logger="potchain")
    stores = [DecidedNode(DEVNET, tmp_path / name) for name in ("a", "b")]
    servers: list[RpcServer] = []
    urls: list[str] = []
    synced_to = 0

    async def serve(network: VotingNode) -> None:
        server = RpcServer(NetworkBackend(network), token="token")
        servers.append(server)
        urls.append(f"http://127.0.0.1:{await trio.to_thread.run_sync(server.start)}")

    async def main() -> None:
        nonlocal synced_to
        # Height 1 tests a training block (on genesis) that A holds before it starts: its first proposal names it.
        assert stores[0].on_training_block(served.training)
        async with trio.open_nursery() as nursery:
            keys = validator_keys(stores[0].genesis)
            config = VotingNodeConfig(validator_keys=keys, proposal_wait_seconds=2.0)
            a = VotingNode(stores[0], config)
            ready = trio.Event()
            nursery.start_soon(a.run, lambda _: ready.set())
            await ready.wait()
            await serve(a)
            with trio.fail_after(120):
                while height_of(stores[0]) < 3:
                    await trio.sleep(0.2)
            synced_to = height_of(stores[0])
            b = VotingNode(stores[1], VotingNodeConfig(bootstrap=[f"{a.listen_addresses[0]}/p2p/{a.peer_id}"]))
            started = trio.Event()
            nursery.start_soon(b.run, lambda _: started.set())
            await started.wait()
            await serve(b)
            with trio.fail_after(120):
                # B can reach synced_to + 2 by sync alone; wait until it has also decided a height by voting.
                while (
                    height_of(stores[1]) < synced_to + 2
                    or len(b.connected_peers()) < 1
                    or voting_decisions(stores[1]) < 1
                ):
                    await trio.sleep(0.2)
                assert b.pubsub is not None
                await b.pubsub.publish(votes_topic(b.chain_id), b"\x93not a voting message")
                while not any(rejection.what == "voting message" for rejection in a.rejections):
                    await trio.sleep(0.1)
                await trio.sleep(1.5)  # the peers loop sets the scores once a second
            a_metrics = await trio.to_thread.run_sync(scrape, urls[0])
            b_metrics = await trio.to_thread.run_sync(scrape, urls[1])
            check(a, b, a_metrics[0], b_metrics[0])
            a.stop()
            b.stop()

    def check(a: VotingNode, b: VotingNode, at_a: Samples, at_b: Samples) -> None:
        for samples, store in ((at_a, stores[0]), (at_b, stores[1])):
            assert value(samples, "potchain_head_height") >= synced_to
            assert value(samples, "potchain_peers_connected") == 1
            assert value(samples, "potchain_round_duration_seconds_count") >= 1
            assert value(samples, "potchain_gossip_messages_total", topic="votes", direction="in") >= 1
            assert value(samples, "potchain_gossip_bytes_total", topic="votes", direction="in") > 0
            tested = [block for h in range(1, synced_to + 1) if has_a_test(block := store.block_at(h))]
            assert tested and not math.isnan(value(samples, "potchain_test_loss"))
            assert value(samples, "potchain_evaluation_seconds_count") >= 1
        assert value(at_a, "potchain_decisions_total", source="voting") >= synced_to
        assert value(at_a, "potchain_gossip_messages_total", topic="votes", direction="out") >= 3 * synced_to
        # B imported the heights it missed from A (sync), then decided by following A's voting.
        assert value(at_b, "potchain_decisions_total", source="sync") >= synced_to
        assert value(at_b, "potchain_decisions_total", source="voting") >= 1
        assert value(at_b, "potchain_sync_blocks_fetched_total") >= synced_to
        assert value(at_b, "potchain_sync_requests_sent_total", method="decided") >= 1
        assert value(at_a, "potchain_sync_requests_served_total", method="decided") >= 1
        assert value(at_a, "potchain_sync_blocks_served_total") >= synced_to
        # A refused B's malformed message: counted by kind and reason, and B's score fell.
        assert value(at_a, "potchain_rejections_total", message="voting_message", reason="malformed") == 1
        assert value(at_a, "potchain_peer_score", peer=b.peer_id) == pytest.approx(-20, abs=0.5)
        assert value(at_b, "potchain_peer_score", peer=a.peer_id) == 0

    try:
        trio.run(main)
    finally:
        for server in servers:
            server.stop()
        for store in stores:
            store.close()
    # The most important log lines carry their facts as fields, which the JSON format writes as keys.
    decided = [r for r in caplog.records if r.getMessage().startswith("decided height")]
    assert decided
    entry = json.loads(JsonFormatter().format(decided[-1]))
    assert {"height", "hash", "round", "proposer"} <= entry.keys() and len(entry["hash"]) == 64
    synced = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.getMessage().startswith("synced")]
    assert synced and {"height", "hash", "peer", "target"} <= synced[0].keys()
    rejected = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.getMessage().startswith("rejected")]
    assert {"peer", "what", "reason", "points", "banned"} <= rejected[0].keys()
    assert any(line["what"] == "voting message" and line["points"] == 20 for line in rejected)
    connected = [r for r in caplog.records if r.getMessage().startswith("peer connected")]
    assert connected and "peer" in json.loads(JsonFormatter().format(connected[0]))


# --- Log formats and progress -------------------------------------------------------------


def make_record(message: str, **fields: Any) -> logging.LogRecord:
    entry = logging.LogRecord("potchain.node", logging.INFO, __file__, 1, message, None, None)
    entry.__dict__.update(fields)
    return entry


def test_json_and_text_formats_write_the_fields() -> None:
    entry = make_record("decided height 7", height=7, hash=b"\xab\xcd", peer="12D3Koo", seconds=0.25, lag=math.inf)
    line = json.loads(JsonFormatter().format(entry))
    assert line["message"] == "decided height 7" and line["level"] == "info" and line["logger"] == "potchain.node"
    fields = (line["height"], line["hash"], line["peer"], line["seconds"], line["lag"])
    assert fields == (7, "abcd", "12D3Koo", 0.25, None)
    text = TextFormatter().format(make_record('refused "x"', reason="height: got 1, want 2", banned=False))
    assert text.endswith(' msg="refused \'x\'" reason="height: got 1, want 2" banned=false'), text


def test_progress_lines_give_the_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="potchain.progress")
    now = [0.0]
    progress = Progress("replay", "blocks", total=10, terminal=False, interval=4.0, clock=lambda: now[0])
    for height in range(1, 11):
        now[0] += 0.5
        progress.advance(1, height=height)
    progress.close()
    lines = [(r.__dict__["done"], r.__dict__["rate"], r.__dict__["eta_seconds"]) for r in caplog.records]
    assert lines == [(1, 2.0, 4.5), (9, 2.0, 0.5), (10, 2.0, None)]  # the first step, 4 s later, the end
    caplog.clear()
    catch_up = CatchUp(terminal=False, interval=0.0)
    for height in (5, 6):
        catch_up.imported(height, 7)  # two heights behind: not worth reporting
    assert not caplog.records
    for height in range(7, 13):
        catch_up.imported(height, 12)
    done = [(r.__dict__["done"], r.__dict__["total"], r.__dict__["target"]) for r in caplog.records]
    assert done[0] == (1, 6, 12) and done[-1] == (6, 6, 12) and catch_up.progress is None


def test_replay_reports_its_progress_as_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = Scenario.create(tmp_path / "builder")
    stored = DecidedNode(DEVNET, tmp_path / "node")
    keys = scenario.validators
    try:
        for index in range(3):
            decide_next(stored, keys[index], keys[0:3], None)
    finally:
        stored.close()
        scenario.node.close()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        code = cli.main(["replay", "--datadir", str(tmp_path / "node"), "--log-format", "json"])
    finally:
        root.handlers[:], root.level = handlers, level
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["decided_blocks"] == 3
    lines = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    progress = [line for line in lines if line.get("job") == "replay"]
    assert progress[0]["done"] == 1 and progress[0]["total"] == 3 and progress[0]["eta_seconds"] >= 0
    assert progress[-1]["done"] == 3 and progress[-1]["eta_seconds"] is None and progress[-1]["rate"] > 0
    assert all(line["unit"] == "blocks" and line["height"] == line["done"] for line in progress)


def test_configure_logging_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format: got 'xml'"):
        configure_logging("info", "xml")


# --- The Grafana dashboard -----------------------------------------------------------------


def test_the_dashboard_queries_only_metrics_a_node_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    _, exposed = parse(NodeMetrics().exposition().decode())
    panels = dashboard["panels"]
    assert len(panels) >= 8
    queried: set[str] = set()
    for panel in panels:
        expressions = [target["expr"] for target in panel["targets"]]
        assert expressions, panel["title"]
        for expression in expressions:
            queried |= set(re.findall(r"\bpotchain_[a-z_]+", expression))
    assert queried and queried <= exposed, queried - exposed
    assert "docs/grafana-dashboard.json" in (ROOT / "docs" / "node.md").read_text()
