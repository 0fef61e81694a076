"""How much of several racing miners' work the chain keeps.

    python bench/multi_miner.py [--miners 4] [--heights 12]

Four miners mine every height from the same parent (the decided head), each
on its own slice (round-robin from its key's offset); the height's decided
block names the valid training block with the largest validation gain (the
proposer's rule, docs/spec.md section 12) and the others lose the race. A
height where no miner meets the difficulty is decided without an update. A
losing miner's steps are not thrown away: they stay in its local model and
reach the chain with its later slices.

`useful_work_fraction` is measured by outcome: the optimizer steps a single
miner needs, through the same chain, to reach the racing chain's final test
loss (from a single-miner run in this process), divided by the steps all
racing miners computed. Racing on one slice with nothing kept would give
1 / miners. `winning_steps_fraction` counts only the steps of the miners'
winning blocks themselves.

`data_parallel_ceiling` bounds what any way of combining several miners'
work could keep: centralized training with the miners' batches averaged into
one (batch x miners) for the racing run's steps per miner, measured as the
single-batch centralized steps that reach the same test loss, over all the
steps computed. Both centralized runs are in this process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from convergence import TestLoss, decide_height, devnet_shards_of, is_confirmed, prepare, run_central, run_chain

from chain.blocks import TrainingBody
from chain.crypto import PrivateKey, devnet_key
from consensus.decided_chain import DecidedChain
from consensus.proposals import propose_best_training_block
from consensus.rules import Chain, compute_assigned_slice, compute_training_seed, genesis_block, genesis_state
from genesis import DEVNET
from node import validator_keys
from training.miner import Miner, TrainingConfig


def race(
    chain: Chain, train_text: bytes, keys: list[PrivateKey], heights: int, config: TrainingConfig, test_loss: TestLoss
) -> tuple[float, int, int]:
    """Returns the final test loss, all steps computed, and the winning blocks' steps."""
    genesis = chain.genesis
    state = genesis_state(genesis)
    decided = DecidedChain.from_genesis(chain, genesis_block(genesis, state), state)
    validators = validator_keys(genesis)
    shards = devnet_shards_of(genesis, test_loss.genesis_path)
    miners = [Miner(chain.weights(state), chain.layout, train_text, config) for _ in keys]
    by_key = {key.public_key: index for index, key in enumerate(keys)}
    computed = winning = 0
    for height in range(heights):
        parent = decided.head
        timestamp = parent.block.header.timestamp + 1
        decided.on_tick(timestamp)
        for key, miner in zip(keys, miners, strict=True):
            slice_id = compute_assigned_slice(parent.block.header, key.public_key, genesis.partition.slices)
            seed = compute_training_seed(parent.block.hash, key.public_key)
            work = miner.work(chain.weights(parent.state), slice_id, seed)
            computed += work.steps
            block = propose_best_training_block(
                chain, parent.block, parent.state, key, work.values, timestamp, work.steps
            )
            assert isinstance(block.body, TrainingBody)
            if block.body.loss_before - block.body.loss_after >= parent.state.difficulty:
                decided.on_training_block(block)
        training = decided.get_best_training_block()
        decision = decide_height(decided, validators, training, shards)
        if training is None:
            print(f"[race] height {height + 1}/{heights}: no miner met the difficulty", file=sys.stderr)
            continue
        index = by_key[training.header.proposer]
        assert isinstance(training.body, TrainingBody)
        if is_confirmed(decision):
            winning += training.body.steps
            values = np.frombuffer(training.body.weights, dtype="<i2")
            miners[index].published(training.body.slice_id, values)
        loss = test_loss(chain.weights(decision.state))
        print(f"[race] height {height + 1}/{heights}: miner {index} wins, test loss {loss:.4f}", file=sys.stderr)
    return test_loss(chain.weights(decided.head.state)), computed, winning


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    """The first (interpolated) step count at which a decreasing curve reaches `target`."""
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else float(s0)
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genesis", type=Path, default=DEVNET)
    parser.add_argument("--miners", type=int, default=4)
    parser.add_argument("--heights", type=int, default=12)
    args = parser.parse_args()
    chain, train_text, test_loss = prepare(args.genesis)
    config = TrainingConfig()
    keys = [devnet_key(f"miner-{i}") for i in range(args.miners)]

    final, computed, winning = race(chain, train_text, keys, args.heights, config, test_loss)
    single_curve, _, _ = run_chain(chain, train_text, computed, config, test_loss)
    equivalent = steps_to_reach(single_curve, final)
    genesis = chain.genesis
    per_miner = computed // args.miners
    central, _ = run_central(genesis.initial_weights(), train_text, computed, config, config.steps, test_loss)
    wide = TrainingConfig(batch_sequences=config.batch_sequences * args.miners)
    averaged, _ = run_central(genesis.initial_weights(), train_text, per_miner, wide, config.steps, test_loss)
    ceiling = steps_to_reach(central, averaged[-1][1])
    print(json.dumps({
        "miners": args.miners,
        "heights": args.heights,
        "steps_per_block": config.steps,
        "steps_computed": computed,
        "racing_test_loss": round(final, 4),
        "single_miner_steps_to_same_loss": None if equivalent == float("inf") else round(equivalent),
        "useful_work_fraction": round(min(equivalent, computed) / computed, 4),
        "winning_steps_fraction": round(winning / computed, 4),
        "data_parallel_ceiling": round(min(ceiling, computed) / computed, 4),
        "averaged_batch_test_loss": round(averaged[-1][1], 4),
        "single_miner_curve": [[s, round(v, 4)] for s, v in single_curve],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
