"""One miner in two CPU processes (gloo): DistributedDataParallel training that matches one process
on the whole batch, and `potchain mine --nproc 2` mining blocks a node accepts."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from consensus.genesis import Genesis
from genesis import DEVNET, chunk_directory, load_genesis
from sim.devnet import stop_all
from tests.conftest import run_potchain
from tests.test_network import start
from training.data import load_split, sample_batch
from training.distributed import DistributedMiner, leave, shard_batch
from training.miner import Miner, TrainingConfig
from training.weights import CanonicalWeights, SliceLayout

SHARD = 4
"""Sequences per process and step."""
CONFIG = TrainingConfig(steps=3, batch_sequences=SHARD, warmup_steps=1)
ROUNDS = ((1, b"first"), (2, b"second"))
"""Each round's slice and seed; the second on a chain whose slice 0 moved."""


def chain_after_first_round(start: CanonicalWeights, layout: SliceLayout) -> CanonicalWeights:
    """The chain's weights for the second round: another miner changed slice 0."""
    return layout.apply(start, 0, (layout.extract(start, 0).astype(np.int32) // 2).astype(np.int16))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def train_rank(rank: int, world_size: int, port: int, out: Path) -> None:
    """A rank of the job: two rounds (rank 0 starts them, rank 1 follows), then its parameters to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        genesis = load_genesis(DEVNET)
        train_text = load_split(genesis.dataset, chunk_directory(DEVNET, genesis), "train")
        layout = SliceLayout(genesis.model, genesis.partition)
        start = genesis.initial_weights()
        miner = DistributedMiner(start, layout, train_text, CONFIG)
        assert miner.sequences_per_step == 2 * CONFIG.batch_sequences  # what a round's tokens per second counts
        miner.synchronize()
        losses = []
        if rank == 0:
            for (slice_id, seed), chain in zip(ROUNDS, (start, chain_after_first_round(start, layout)), strict=True):
                losses.append(miner.work(chain, slice_id, seed).training_loss)
            miner.release()
        else:
            assert miner.follow() == len(ROUNDS)
        torch.save({"model": miner.model.state_dict(), "losses": losses, "steps": miner.steps_done}, out / f"{rank}.pt")
    finally:
        leave()  # the ranks meet before the group is torn down


def test_the_shards_of_the_processes_make_up_the_single_process_batch(train_text: bytes) -> None:
    whole = sample_batch(train_text, b"seed", 3 * SHARD, 128)
    shards = [shard_batch(train_text, b"seed", SHARD, 128, rank, 3) for rank in range(3)]
    for part in (0, 1):
        assert torch.equal(torch.cat([shard[part] for shard in shards]), whole[part])
    assert not torch.equal(shards[0][0], shards[1][0])
    with pytest.raises(ValueError, match="rank: got 3"):
        shard_batch(train_text, b"seed", SHARD, 128, 3, 3)


def test_two_processes_train_as_one_process_on_the_whole_batch(
    devnet: Genesis, train_text: bytes, tmp_path: Path
) -> None:
    spawn(train_rank, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == CONFIG.steps * len(ROUNDS)
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name  # DDP keeps the ranks identical

    layout = SliceLayout(devnet.model, devnet.partition)
    start = devnet.initial_weights()
    single = Miner(start, layout, train_text, TrainingConfig(steps=3, batch_sequences=2 * SHARD, warmup_steps=1))
    single_losses = []
    for (slice_id, seed), chain in zip(ROUNDS, (start, chain_after_first_round(start, layout)), strict=True):
        single_losses.append(single.work(chain, slice_id, seed).training_loss)
    assert ranks[0]["losses"] == pytest.approx(single_losses, rel=1e-5)
    moved = 0.0
    for name, value in single.model.state_dict().items():
        difference = (ranks[0]["model"][name] - value).abs()
        assert difference.max().item() < 1e-3, name  # float rounding of the averaged gradients
        moved = max(moved, (value - start.real(name)).abs().max().item())
    assert moved > 1e-3  # the steps moved the weights by more than the tolerance


@pytest.mark.slow
def test_two_processes_mine_blocks_the_chain_accepts(tmp_path: Path) -> None:
    validators = [arg for i in range(4) for arg in ("--validator-key", f"devnet:validator-{i}")]
    node = start("node", tmp_path, *validators)
    try:
        completed = run_potchain("mine", "--nproc", "2", "--rpc", node.rpc, "--token-file",
                                 str(node.datadir / "rpc_token"), "--key", "devnet:miner-1", "--blocks", "1",
                                 "--steps", "10", timeout=300)  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        result = completed.json()
        assert result["submitted"] == 1
        assert "(2 processes)" in completed.stderr
        deadline = time.monotonic() + 120
        while node.get(f"/v1/accounts/{result['miner']}")["balance"] == 0:  # until the next height applies it
            assert time.monotonic() < deadline, "the submitted block was never applied"
            time.sleep(1.0)
        missing = run_potchain("mine", "--nproc", "2", "--rpc", node.rpc, "--key", "devnet:miner-1")
        assert missing.returncode == 2 and "RPC token" in missing.stderr  # before any process starts
        none = run_potchain("mine", "--nproc", "0", "--rpc", node.rpc, "--key", "devnet:miner-1")
        assert none.returncode == 2 and "--nproc: got 0, want at least 1" in none.stderr
    finally:
        assert set(stop_all([node]).values()) == {0}
