"""Voting nodes on real libp2p hosts over loopback TCP: four validators decide
heights by voting rounds, include a gossiped training block, store the same
chain; a fifth node that starts late catches up by sync, certificates and all."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from chain.blocks import DecidedBody
from chain.crypto import devnet_key
from consensus.rules import StaleBlock
from consensus.voting import TimeoutParameters
from genesis import DEVNET, chunk_directory, load_genesis
from node import validator_keys
from p2p.decided_node import DecidedNode, mean_loss
from p2p.voting_node import VotingNode, VotingNodeConfig
from tests.chain_builders import Scenario
from training.miner import TrainingConfig


def included(store: DecidedNode, published: list[bytes]) -> bool:
    """Whether a decided block names one of the published training blocks."""
    height = store.head().block.header.height
    named = {
        verdict.training_block
        for h in range(1, height + 1)
        for verdict in getattr(store.block_at(h), "body", DecidedBody((), None, (), None)).training
    }
    return bool(named & set(published))


def test_four_validators_decide_heights_over_libp2p_and_a_late_node_syncs(tmp_path: Path) -> None:
    scenario = Scenario.create(tmp_path / "builder")
    stores = [DecidedNode(DEVNET, tmp_path / f"node{i}") for i in range(5)]
    nodes: list[VotingNode] = []
    top = 0

    async def main() -> None:
        nonlocal top
        async with trio.open_nursery() as nursery:
            for index in range(4):
                bootstrap = [f"{nodes[0].listen_addresses[0]}/p2p/{nodes[0].peer_id}"] if nodes else []
                config = VotingNodeConfig(
                    bootstrap=bootstrap, validator_keys=[scenario.validators[index]],
                    timeouts=TimeoutParameters(8000, 1500, 1500, 1000), proposal_wait_seconds=3.0,
                )  # fmt: skip
                node = VotingNode(stores[index], config)
                ready = trio.Event()
                nursery.start_soon(node.run, lambda _, ready=ready: ready.set())
                await ready.wait()
                nodes.append(node)
            published: list[bytes] = []
            with trio.fail_after(300):
                while min(n.voting.height for n in nodes) < 2:
                    await trio.sleep(0.2)
                while not included(stores[0], published):
                    # A training block on the current head; it joins the next height if it reaches
                    # that height's proposer in time (on a loaded machine, maybe only a later try's).
                    head = stores[0].head()
                    training = await trio.to_thread.run_sync(scenario.valid_training_block, head.block, head.state)
                    try:
                        await nodes[0].publish_training_block(training)
                    except StaleBlock:
                        continue
                    published.append(training.hash)
                    target = head.block.header.height + 2
                    while min(n.voting.height for n in nodes) <= target:
                        await trio.sleep(0.2)
            top = min(n.voting.height for n in nodes) - 1
            late = VotingNode(
                stores[4], VotingNodeConfig(bootstrap=[f"{nodes[1].listen_addresses[0]}/p2p/{nodes[1].peer_id}"])
            )
            nursery.start_soon(late.run)
            with trio.fail_after(120):
                while late.voting.height <= top:
                    await trio.sleep(0.2)
            for node in [*nodes, late]:
                node.stop()

    try:
        trio.run(main)
        for height in range(1, top + 1):
            blocks = {store.block_at(height) for store in stores}
            assert len(blocks) == 1 and None not in blocks
            assert all(store.commit_of(store.block_at(height).hash) is not None for store in stores)  # type: ignore[union-attr]
    finally:
        for store in stores:
            store.close()
        scenario.node.close()


def test_a_whole_network_restarted_in_the_middle_of_a_height_resumes(tmp_path: Path) -> None:
    """Every node stops at once while a height is being voted on, and starts again from
    its data directory: the signer records resume their rounds and re-send what they
    signed (never anything conflicting: the records would refuse it), and heights go on."""
    scenario = Scenario.create(tmp_path / "builder")
    keys = scenario.validators

    async def run_network(stop_when: int) -> int:
        stores = [DecidedNode(DEVNET, tmp_path / f"node{i}") for i in range(4)]
        nodes: list[VotingNode] = []
        try:
            async with trio.open_nursery() as nursery:
                for index in range(4):
                    bootstrap = [f"{nodes[0].listen_addresses[0]}/p2p/{nodes[0].peer_id}"] if nodes else []
                    node = VotingNode(
                        stores[index], VotingNodeConfig(bootstrap=bootstrap, validator_keys=[keys[index]])
                    )
                    ready = trio.Event()
                    nursery.start_soon(node.run, lambda _, ready=ready: ready.set())
                    await ready.wait()
                    nodes.append(node)
                with trio.fail_after(240):
                    while min(n.voting.height for n in nodes) < stop_when:
                        await trio.sleep(0.1)
                    # Stop in the middle of the next height: once someone signed something there.
                    while not any(n.voting.signed for n in nodes):
                        await trio.sleep(0.05)
                for node in nodes:
                    node.stop()
            return min(store.head().block.header.height for store in stores)
        finally:
            for store in stores:
                store.close()

    async def main() -> None:
        reached = await run_network(stop_when=2)
        resumed = await run_network(stop_when=reached + 3)
        assert resumed >= reached + 2

    try:
        trio.run(main)
        stores = [DecidedNode(DEVNET, tmp_path / f"node{i}") for i in range(4)]
        top = min(store.head().block.header.height for store in stores)
        for height in range(1, top + 1):
            assert len({store.block_at(height) for store in stores}) == 1
        for store in stores:
            store.close()
    finally:
        scenario.node.close()


def test_a_miner_s_updates_are_confirmed_out_of_sample_and_the_test_loss_falls(tmp_path: Path) -> None:
    """Four validators and a miner: decided blocks confirm the miner's updates on test
    batches seeded by the proposers' ECVRF outputs, and the model's test loss falls."""
    keys = Scenario.create(tmp_path / "builder").validators
    stores = [DecidedNode(DEVNET, tmp_path / f"node{i}") for i in range(4)]
    nodes: list[VotingNode] = []
    training = TrainingConfig(steps=10, batch_sequences=16, warmup_steps=1)

    def confirmed(store: DecidedNode) -> int:
        return sum(
            1
            for height in range(1, store.head().block.header.height + 1)
            if getattr(store.block_at(height), "body", DecidedBody((), None, (), None)).applied
        )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(4):
                bootstrap = [f"{nodes[0].listen_addresses[0]}/p2p/{nodes[0].peer_id}"] if nodes else []
                miner = devnet_key("miner-0") if index == 0 else None
                config = VotingNodeConfig(bootstrap=bootstrap, validator_keys=[keys[index]], miner_key=miner,
                                          training=training)  # fmt: skip
                node = VotingNode(stores[index], config)
                ready = trio.Event()
                nursery.start_soon(node.run, lambda _, ready=ready: ready.set())
                await ready.wait()
                nodes.append(node)
            with trio.fail_after(300):
                while confirmed(stores[1]) < 2:
                    await trio.sleep(0.5)
            for node in nodes:
                node.stop()

    try:
        trio.run(main)
        head = stores[1].head()
        genesis_state = stores[1].db.state(stores[1].genesis_block.hash)
        assert mean_loss(stores[1].chain, head.state, "test") < mean_loss(stores[1].chain, genesis_state, "test")
        miner = devnet_key("miner-0").public_key
        assert head.state.accounts[miner].balance > 0  # paid for confirmed updates
    finally:
        for store in stores:
            store.close()


def test_a_network_whose_miner_cannot_meet_the_difficulty_keeps_deciding_heights(tmp_path: Path) -> None:
    """A test genesis whose difficulty no update can reach: the miner trains and never
    publishes, and one node holding every validator key still decides height after height,
    each without an update (the chain's liveness does not depend on the model)."""
    document = json.loads(DEVNET.read_text())
    document["consensus"]["initial_difficulty"] = 2**62
    genesis_path = tmp_path / "unreachable.json"
    genesis_path.write_text(json.dumps(document))
    chunks = tmp_path / document["dataset"]["chunk_directory"]
    chunks.parent.mkdir(parents=True, exist_ok=True)
    chunks.symlink_to(chunk_directory(DEVNET, load_genesis(DEVNET)))
    store = DecidedNode(genesis_path, tmp_path / "node")
    keys = validator_keys(store.genesis)
    config = VotingNodeConfig(validator_keys=keys, miner_key=devnet_key("miner-0"), proposal_wait_seconds=1.0,
                              training=TrainingConfig(steps=4, batch_sequences=8, warmup_steps=1))  # fmt: skip
    node = VotingNode(store, config)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.run)
            with trio.fail_after(300):
                while store.head().block.header.height < 3:
                    await trio.sleep(0.2)
            node.stop()

    try:
        trio.run(main)
        assert store.head().state.difficulty > 2**61  # it may only fall slowly, after heights without updates
        for height in range(1, 4):
            block = store.block_at(height)
            assert block is not None and isinstance(block.body, DecidedBody) and block.body.training == ()
            assert store.commit_of(block.hash) is not None
        assert store.training_blocks() == []  # the miner never met the difficulty, so it offered nothing
    finally:
        store.close()
