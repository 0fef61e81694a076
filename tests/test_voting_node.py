"""Voting nodes on real libp2p hosts over loopback TCP: four validators decide
heights by voting rounds, include a gossiped training block, store the same
chain; a fifth node that starts late catches up by sync, certificates and all."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from chain.blocks import Block, DecidedBody, Reward, TrainingBody, compute_update_hash
from chain.crypto import devnet_key
from consensus.decisions import get_committed_updates, is_committed, propose_decided_block
from consensus.proposals import propose_training_block
from consensus.rules import StaleBlock, compute_next_slice
from consensus.voting import TimeoutParameters
from genesis import DEVNET, chunk_directory, load_genesis
from node import validator_keys
from p2p.decided_node import DecidedNode, mean_loss
from p2p.mining import get_awaited_miners
from p2p.voting_node import VotingNode, VotingNodeConfig
from tests.chain_builders import Scenario, certificate, commit_to, devnet_test_shard
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


def paid_updates(store: DecidedNode, miner: bytes) -> list[tuple[Block, Block, Block]]:
    """(decided block h carrying the miner's commitment, the miner's training block revealed on it,
    decided block h + 1 that applied it and paid the miner) for each such height."""
    found = []
    for height in range(2, store.head().block.header.height + 1):
        carrier, judge = store.block_at(height - 1), store.block_at(height)
        assert carrier is not None and judge is not None and isinstance(judge.body, DecidedBody)
        rewards = judge.body.rewards
        for applied_hash in judge.body.applied:
            applied = store.stored_block(applied_hash)
            if applied is None or applied.header.proposer != miner or miner not in get_committed_updates(carrier):
                continue
            if any(reward.address == miner for reward in rewards):
                found.append((carrier, applied, judge))
    return found


def test_a_miner_commits_reveals_and_is_paid_for_updates_confirmed_out_of_sample(tmp_path: Path) -> None:
    """Four validators and a miner: the miner commits to each update while a height is being
    decided, the decided block carries the commitment, the miner reveals the update on it, and
    the next decided block applies it on held-out data and pays the miner first; the model's
    test loss falls."""
    keys = Scenario.create(tmp_path / "builder").validators
    stores = [DecidedNode(DEVNET, tmp_path / f"node{i}") for i in range(4)]
    nodes: list[VotingNode] = []
    training = TrainingConfig(steps=10, batch_sequences=16, warmup_steps=1)
    miner = devnet_key("miner-0")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(4):
                bootstrap = [f"{nodes[0].listen_addresses[0]}/p2p/{nodes[0].peer_id}"] if nodes else []
                config = VotingNodeConfig(bootstrap=bootstrap, validator_keys=[keys[index]],
                                          miner_key=miner if index == 0 else None, training=training)  # fmt: skip
                node = VotingNode(stores[index], config)
                ready = trio.Event()
                nursery.start_soon(node.run, lambda _, ready=ready: ready.set())
                await ready.wait()
                nodes.append(node)
            with trio.fail_after(300):
                while len(paid_updates(stores[1], miner.public_key)) < 2:
                    await trio.sleep(0.5)
            for node in nodes:
                node.stop()

    try:
        trio.run(main)
        store = stores[1]
        reward = store.genesis.consensus.block_reward * store.genesis.consensus.miner_share_percent // 100
        for carrier, applied, judge in paid_updates(store, miner.public_key):
            assert isinstance(carrier.body, DecidedBody) and isinstance(applied.body, TrainingBody)
            (commitment,) = [c for c in carrier.body.commitments if c.miner == miner.public_key]
            assert commitment.height == carrier.header.height
            assert (applied.header.parent, applied.header.proposer) == (carrier.hash, miner.public_key)
            assert commitment.update_hash == compute_update_hash(
                miner.public_key, applied.body.slice_id, applied.body.weights
            )
            assert is_committed(carrier, applied)
            assert isinstance(judge.body, DecidedBody) and judge.body.applied == (applied.hash,)  # the only miner
            assert judge.body.rewards[0] == Reward(miner.public_key, reward)
        head = store.head()
        genesis_state = store.db.state(store.genesis_block.hash)
        assert mean_loss(store.chain, head.state, "test") < mean_loss(store.chain, genesis_state, "test")
        assert head.state.accounts[miner.public_key].balance >= 2 * reward
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
        # It trained all along: its rounds, tokens, speed and training loss are in the node's metrics.
        metrics = {sample.name: sample.value for family in text_string_to_metric_families(
            store.metrics.exposition().decode()) for sample in family.samples}  # fmt: skip
        rounds = metrics["potchain_miner_rounds_total"]
        assert rounds >= 1 and metrics["potchain_miner_tokens_total"] == rounds * 4 * 8 * store.genesis.model.context
        assert metrics["potchain_miner_tokens_per_second"] > 0 and 0 < metrics["potchain_miner_training_loss"] < 8
    finally:
        store.close()


PROPOSAL_WAIT_SECONDS = 12.0


def seconds_to_decide_after_a_reveal(datadir: Path, commit_after: float | None) -> tuple[float, Block]:
    """One node holding every validator key, its head (height 1) carrying miner M's commitment
    and M's committed update revealed on it, so the height-2 proposer awaits M's next
    commitment (docs/spec.md, section 12). M sends it `commit_after` seconds after the network
    starts, or never (None). Returns the seconds until height 2 is decided, and its block."""
    scenario = Scenario.create(datadir)
    node, chain, keys, miner = scenario.node, scenario.chain, scenario.validators, scenario.miner
    slices = chain.genesis.partition.slices
    genesis, genesis_state = scenario.genesis()
    trainer = scenario.local_miner(genesis_state)
    weights = chain.weights(genesis_state)
    first_slice, next_slice = (compute_next_slice(h, slices) for h in (1, 2))
    values = trainer.work(weights, first_slice, b"train").values
    shard = devnet_test_shard(keys[1].public_key)
    first = propose_decided_block(chain, genesis, genesis_state, keys[1], [], None, None, (), shard,
                                  [commit_to(scenario, miner, 1, first_slice, values)])  # fmt: skip
    node.import_decided(first, certificate(node, first, keys[:3]))
    reveal = propose_training_block(chain, first, node.head().state, miner, values, first.header.timestamp + 1, 4)
    assert node.on_training_block(reveal) and get_awaited_miners(node.decided) == {miner.public_key}
    next_commitment = commit_to(scenario, miner, 2, next_slice, trainer.values(weights, next_slice))
    voting = VotingNode(node, VotingNodeConfig(validator_keys=keys, proposal_wait_seconds=PROPOSAL_WAIT_SECONDS))
    elapsed = 0.0

    async def main() -> None:
        nonlocal elapsed
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(voting.run)
            if commit_after is not None:
                await trio.sleep(commit_after)
                assert await trio.to_thread.run_sync(node.on_commitment, next_commitment)
            with trio.fail_after(PROPOSAL_WAIT_SECONDS + 120):
                while node.block_at(2) is None:  # stored, not only decided
                    await trio.sleep(0.05)
            elapsed = trio.current_time() - started
            voting.stop()

    try:
        trio.run(main)
        decided = node.block_at(2)
        assert decided is not None
        return elapsed, decided
    finally:
        node.close()


def test_a_miner_withholding_its_next_commitment_delays_a_height_by_at_most_the_proposal_wait(tmp_path: Path) -> None:
    """The proposer waits for each miner that revealed its committed update on the head to
    commit for the next height (node policy), within the proposal wait: a miner that commits
    after 1 s ends the wait (its commitment rides in the next block); one that withholds it
    delays the height by the wait and no more, and its revealed update is applied all the same."""
    prompt, with_commitment = seconds_to_decide_after_a_reveal(tmp_path / "commits", commit_after=1.0)
    withheld, without_commitment = seconds_to_decide_after_a_reveal(tmp_path / "withholds", commit_after=None)
    with_body, without_body = with_commitment.body, without_commitment.body
    assert isinstance(with_body, DecidedBody) and isinstance(without_body, DecidedBody)
    assert len(with_body.applied) == 1 and len(without_body.applied) == 1
    assert len(with_body.commitments) == 1 and without_body.commitments == ()
    assert prompt < PROPOSAL_WAIT_SECONDS - 2, f"decided after {prompt:.1f} s with the commitment sent at 1 s"
    assert PROPOSAL_WAIT_SECONDS <= withheld < PROPOSAL_WAIT_SECONDS + 30, f"withheld: decided after {withheld:.1f} s"
