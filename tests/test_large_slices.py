"""A node joins a network whose training blocks carry testnet-size slices, and
catches up by sync: several decided heights, each confirming a training block
of about 6.5 MB, travel as one `decided` answer in 4 MiB frames, and the new
node imports them with their certificates and reaches the same head.

The genesis has one slice as large as the testnet's (genesis/testnet.json's
model divided by its partition) with a one-layer model whose evaluation is
cheap: a short context and small batches."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import trio

from chain.blocks import Block, DecidedBody, TrainingBody
from chain.crypto import devnet_key
from chain.heldout import Shard, devnet_shards
from chain.state import State
from consensus.proposals import propose_training_block
from consensus.rules import InvalidBlock
from genesis import DEVNET, GENESIS_DIR, TESTNET, chunk_directory, load_genesis
from genesis.build import tensor_specs
from node import validator_keys
from p2p.decided_node import DecidedNode
from p2p.voting_node import MAX_DECIDED_RESPONSE_BYTES, VotingNode, VotingNodeConfig
from p2p.wire import MAX_FRAME_BYTES
from tests.chain_builders import decide_next
from training.data import load_split
from training.miner import Miner, TrainingConfig
from training.model import ModelConfig

LARGE_SLICE_MODEL = ModelConfig(vocab_size=256, context=16, layers=1, heads=8, width=512)
"""One layer of the testnet's width: 3.29 million weights, all in one slice."""
HEIGHTS = 3
"""Decided heights with an update before the new node joins."""
TRAINING = TrainingConfig(steps=2, learning_rate=1e-3, warmup_steps=1, batch_sequences=16)
"""Two Adam steps per update (each about a second on 2 cores), enough to lower the validation loss."""
MINING_ATTEMPTS = 4


def slice_values(config: ModelConfig, slices: int) -> int:
    """Values in a partition's largest slice (each tensor dealt round-robin)."""
    return sum(-(-math.prod(shape) // slices) for shape in config.tensor_shapes().values())


def write_large_slice_genesis(directory: Path) -> Path:
    """The devnet's genesis with LARGE_SLICE_MODEL in one slice, 4-sequence batches,
    and the shipped corpus (linked)."""
    directory.mkdir(parents=True)
    (directory / "data").symlink_to(GENESIS_DIR / "data", target_is_directory=True)
    document = json.loads(DEVNET.read_text())
    config = LARGE_SLICE_MODEL
    document["chain_id"] = "potchain-large-slices-1"
    document["model"] = {
        "vocab_size": config.vocab_size, "context": config.context, "layers": config.layers,
        "heads": config.heads, "width": config.width, "init_seed": 1, "tensors": tensor_specs(config),
    }  # fmt: skip
    document["partition"] = {"scheme": "random-mask", "slices": 1, "seed": 2}
    document["evaluation"].update(validation_sequences=4, test_sequences=4)
    for account, shard in zip(document["accounts"], large_slice_shards(document), strict=True):
        account["heldout"] = {"root": shard.root.hex(), "sequences": shard.count}
    path = directory / "large-slices.json"
    path.write_text(json.dumps(document))
    return path


def large_slice_shards(document: dict[str, Any]) -> list[Shard]:
    """The validators' held-out shards for this model's context (cut from the public test
    documents, as the devnet's are)."""
    genesis = load_genesis(DEVNET)
    text = load_split(genesis.dataset, chunk_directory(DEVNET, genesis), "test")
    return devnet_shards(text, document["model"]["context"] + 1, len(document["accounts"]))


def mine(miner: Miner, node: DecidedNode, parent: Block, state: State) -> Block:
    """A valid training block on `parent`: the miner's next work that lowers the validation
    loss by the difficulty (training is stochastic: a few seeds are tried, as a miner would)."""
    weights = node.chain.weights(state)
    for attempt in range(MINING_ATTEMPTS):
        work = miner.work(weights, 0, parent.hash + attempt.to_bytes(4, "big"))
        try:
            return propose_training_block(
                node.chain, parent, state, devnet_key("miner-0"), work.values, parent.header.timestamp + 10, work.steps
            )
        except InvalidBlock as error:
            failure = error
    raise AssertionError(f"no valid work in {MINING_ATTEMPTS} attempts: {failure}")


def test_the_genesis_slice_is_as_large_as_the_testnets(tmp_path: Path) -> None:
    testnet = load_genesis(TESTNET)
    testnet_values = slice_values(testnet.model, testnet.partition.slices)
    genesis = load_genesis(write_large_slice_genesis(tmp_path / "genesis"))
    values = slice_values(genesis.model, genesis.partition.slices)
    assert 3_000_000 < testnet_values <= values < 1.05 * testnet_values


def test_a_node_joining_a_network_of_testnet_size_slices_catches_up(tmp_path: Path) -> None:
    path = write_large_slice_genesis(tmp_path / "genesis")
    source = DecidedNode(path, tmp_path / "source")
    joining = DecidedNode(path, tmp_path / "joining")
    try:
        genesis = source.genesis
        train_text = load_split(genesis.dataset, chunk_directory(path, genesis), "train")
        keys = validator_keys(genesis)
        shards = dict(zip((k.public_key for k in keys), large_slice_shards(json.loads(path.read_text())), strict=True))
        miner = Miner(source.chain.weights(source.head().state), source.chain.layout, train_text, TRAINING)
        training_bytes, gains = [], []
        for height in range(1, HEIGHTS + 1):
            head = source.head()
            training = mine(miner, source, head.block, head.state)
            training_bytes.append(len(training.encode()))
            proposer = keys[height % len(keys)]
            decided = decide_next(source, proposer, keys[:3], training, shards[proposer.public_key])
            assert isinstance(decided.body, DecidedBody) and decided.body.training[0].training_block == training.hash
            gains.append(decided.body.gains()[training.hash])
        assert any(gain > 0 for gain in gains), gains  # an update confirmed out of sample changed the model
        top = source.head().block
        assert top.header.height == HEIGHTS
        # Each update is a testnet-size training block; together they take five frames,
        # and they fit one `decided` answer.
        assert min(training_bytes) > 6_500_000 and 4 * MAX_FRAME_BYTES < sum(training_bytes) < 5 * MAX_FRAME_BYTES
        assert sum(training_bytes) < MAX_DECIDED_RESPONSE_BYTES

        async def main() -> None:
            serving = VotingNode(source, VotingNodeConfig())
            async with trio.open_nursery() as nursery:
                ready = trio.Event()
                nursery.start_soon(serving.run, lambda _: ready.set())
                await ready.wait()
                address = f"{serving.listen_addresses[0]}/p2p/{serving.peer_id}"
                late = VotingNode(joining, VotingNodeConfig(bootstrap=[address]))
                nursery.start_soon(late.run)
                with trio.fail_after(60):
                    while late.voting.height <= HEIGHTS:
                        await trio.sleep(0.2)
                assert not late.rejections, late.rejections
                serving.stop()
                late.stop()

        trio.run(main)
        assert joining.head().block.hash == top.hash
        assert joining.head().state.root == source.head().state.root
        for height in range(1, HEIGHTS + 1):
            block = joining.block_at(height)
            assert block is not None and block == source.block_at(height)
            assert joining.commit_of(block.hash) == source.commit_of(block.hash)
            assert isinstance(block.body, DecidedBody)
            named = joining.block_by_hash(block.body.training[0].training_block)
            assert named is not None and isinstance(named.body, TrainingBody)
            assert len(named.body.weights) == 2 * slice_values(genesis.model, 1)
    finally:
        source.close()
        joining.close()
