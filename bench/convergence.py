"""How much of centralized training's progress the chain keeps.

    python bench/convergence.py [--steps 1000] [--block-steps 30] [--scheme model|slice]

In one run: trains the devnet model centralized (AdamW, every step on every
weight) and through the chain (a miner publishing slices of 1/4 of the
weights, one training block per decided height, each tested out of sample by
the height's proposer and decided with a certificate of every validator's
precommits, every block through the real rules of the decided chain and the
canonical evaluator) for the same number of optimizer steps, then prints JSON:

- `loss_reduction_ratio`: rU = (L_unigram - L_chain) / (L_unigram - L_central)
  on the test split at equal optimizer steps; L_unigram is the test loss of
  the training split's byte frequencies, computed in this run;
- `loss_reduction_ratio_equal_compute`: the same against the centralized run
  at the step count its time per step buys with the chain's whole wall time
  (mining, proofs, out-of-sample tests and verification);
- the curves (optimizer steps, test loss) of both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from chain.blocks import Block, DecidedBody, TrainingBody, UpdateCommitment
from chain.crypto import PrivateKey, devnet_key
from chain.heldout import Shard
from chain.votes import Commit, Vote, VoteKind, sign_vote
from consensus.decided_chain import DecidedChain, Decision
from consensus.decisions import propose_decided_block
from consensus.genesis import Genesis
from consensus.proposals import propose_best_training_block
from consensus.rules import Chain, compute_assigned_slice, compute_training_seed, genesis_block, genesis_state
from genesis import DEVNET, chunk_directory, devnet_shard, load_genesis
from node import tune_memory_allocator, validator_keys
from training.baseline import train_centralized
from training.data import load_split, sample_batch, seed_from_int
from training.evaluate import CanonicalEvaluator, default_backend, make_backend
from training.miner import Miner, TrainingConfig
from training.tables import LOSS_BITS
from training.weights import CanonicalWeights

TEST_BATCHES = 4


def unigram_loss(train_text: bytes, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Test loss (nats per byte) of the training split's byte frequencies (add-one smoothed)."""
    counts = Counter(train_text)
    total = len(train_text) + 256
    log_probability = {byte: math.log((counts.get(byte, 0) + 1) / total) for byte in range(256)}
    targets = torch.cat([t.reshape(-1) for _, t in batches]).tolist()
    return -sum(log_probability[b] for b in targets) / len(targets)


class TestLoss:
    """Canonical test loss (nats per byte) over fixed test batches."""

    def __init__(self, chain: Chain, batches: list[tuple[torch.Tensor, torch.Tensor]], genesis_path: Path) -> None:
        self.tables = chain.genesis.tables()
        self.batches = batches
        self.genesis_path = genesis_path

    def __call__(self, weights: CanonicalWeights) -> float:
        evaluator = CanonicalEvaluator(weights, self.tables, make_backend(default_backend("cpu")))
        results = [evaluator.per_token_losses(x, y) for x, y in self.batches]
        return sum(r.loss_total for r in results) / sum(r.tokens for r in results) / (1 << LOSS_BITS)


def decide_height(
    decided: DecidedChain,
    validators: list[PrivateKey],
    training: Block | Sequence[Block] | None,
    shards: Mapping[bytes, Shard],
    commitments: Sequence[UpdateCommitment] = (),
) -> Decision:
    """Decide the next height as the voting rounds would: the height's proposer (rotating with
    the height) proposes a decided block naming `training` (one block, several, or none) and
    carrying `commitments`, and every validator's precommit, stamped a target interval after
    the block, forms its commit certificate (so heights are a target interval apart).
    `on_decided` checks the certificate and every rule."""
    chain, head = decided.chain, decided.head
    proposer = validators[decided.height % len(validators)]
    named = [] if training is None else [training] if isinstance(training, Block) else list(training)
    block = propose_decided_block(
        chain, head.block, head.state, proposer, named, head.commit,
        decided.head_validators, (), shards.get(proposer.public_key), commitments,
    )  # fmt: skip
    when = block.header.timestamp + chain.genesis.consensus.target_interval_seconds
    height = block.header.height
    commit = Commit.of([
        sign_vote(key, chain.domain, Vote(VoteKind.PRECOMMIT, height, 0, block.hash, when, key.public_key))
        for key in validators
    ])  # fmt: skip
    decided.on_tick(when)
    return decided.on_decided(block, commit, {named_block.hash: named_block for named_block in named})


def is_confirmed(decision: Decision) -> bool:
    """Whether a decided height confirmed the training block it names (test gain > 0)."""
    body = decision.block.body
    assert isinstance(body, DecidedBody)
    return bool(body.applied)


def run_chain(
    chain: Chain, train_text: bytes, steps: int, config: TrainingConfig, test_loss: TestLoss
) -> tuple[list[tuple[int, float]], float, dict[str, int]]:
    shards = devnet_shards_of(chain.genesis, test_loss.genesis_path)
    """Mine until `steps` optimizer steps, one attempt per decided height; returns the curve,
    seconds, and block counts. An attempt whose gain misses the difficulty is not proposed
    (the miner keeps its training): that height is decided without an update."""
    genesis = chain.genesis
    state = genesis_state(genesis)
    decided = DecidedChain.from_genesis(chain, genesis_block(genesis, state), state)
    miner_key = devnet_key("miner-0")
    validators = validator_keys(genesis)
    miner = Miner(chain.weights(state), chain.layout, train_text, config)
    curve = [(0, test_loss(chain.weights(state)))]
    counts = {"accepted": 0, "rejected": 0, "rejected_out_of_sample": 0, "heights": 0}
    started = time.perf_counter()
    done = 0
    while done < steps:
        parent = decided.head
        slice_id = compute_assigned_slice(parent.block.header, genesis.partition.slices)
        seed = compute_training_seed(parent.block.hash, miner_key.public_key) + done.to_bytes(4, "big")
        work = miner.work(chain.weights(parent.state), slice_id, seed)
        done += work.steps
        timestamp = parent.block.header.timestamp + 1
        training = propose_best_training_block(
            chain, parent.block, parent.state, miner_key, work.values, timestamp, work.steps
        )
        body = training.body
        assert isinstance(body, TrainingBody)
        counts["heights"] += 1
        if body.loss_before - body.loss_after < parent.state.difficulty:
            counts["rejected"] += 1  # not worth proposing: the miner keeps training
            decide_height(decided, validators, None, shards)
            continue
        decided.on_tick(timestamp)
        decided.on_training_block(training)
        decision = decide_height(decided, validators, decided.get_best_training_block(), shards)
        if not is_confirmed(decision):
            counts["rejected_out_of_sample"] += 1
            continue
        miner.published(body.slice_id, np.frombuffer(body.weights, dtype="<i2"))
        counts["accepted"] += 1
        curve.append((done, test_loss(chain.weights(decision.state))))
        print(f"[chain] {done}/{steps} steps, test loss {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
    return curve, time.perf_counter() - started, counts


def run_central(
    weights: CanonicalWeights,
    train_text: bytes,
    steps: int,
    config: TrainingConfig,
    every: int,
    test_loss: TestLoss,
    data_seed: int = 0,
) -> tuple[list[tuple[int, float]], float]:
    """AdamW on every weight, same batches, schedule and learning rate as the miner
    (other batches for another `data_seed`)."""

    def progress(step: int, loss: float) -> None:
        print(f"[central] {step}/{steps} steps, test loss {loss:.4f}", file=sys.stderr, flush=True)

    return train_centralized(weights, train_text, steps, config, every, test_loss, progress, data_seed)


def loss_at(curve: list[tuple[int, float]], steps: float) -> float:
    """Linear interpolation of a curve at `steps` (clamped to its ends)."""
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if s0 <= steps <= s1:
            return l0 + (l1 - l0) * (steps - s0) / (s1 - s0)
    return curve[-1][1] if steps > curve[-1][0] else curve[0][1]


def devnet_shards_of(genesis: Genesis, genesis_path: Path) -> dict[bytes, Shard]:
    """The devnet validators' INSECURE held-out shards (genesis.devnet_shard)."""
    shards = {a.public_key: devnet_shard(genesis, genesis_path, a.public_key) for a in genesis.accounts}
    return {address: shard for address, shard in shards.items() if shard is not None}


def prepare(genesis_path: Path, threads: int | None = None) -> tuple[Chain, bytes, TestLoss]:
    """The node's tuning, a fixed torch seed, the chain's rules and data, and the test-loss probe.

    With `threads`, torch runs on that many threads and MKL on its conditional numerical
    reproducibility path (`MKL_CBWR=AUTO,STRICT`, read at MKL's first call; a value already
    set is kept). Two runs of one command at two threads drifted apart by 0.01-0.1 in test
    loss after a few hundred steps (docs/benchmarks.md); at one thread, so prepared, the
    benches' training repeats bit for bit (tests/test_determinism.py)."""
    if threads is not None:
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        torch.set_num_threads(threads)
    tune_memory_allocator()
    torch.manual_seed(0)
    genesis = load_genesis(genesis_path)
    directory = chunk_directory(genesis_path, genesis)
    chain = Chain(genesis, load_split(genesis.dataset, directory, "validation"),
                  load_split(genesis.dataset, directory, "test"))  # fmt: skip
    train_text = load_split(genesis.dataset, directory, "train")
    context = genesis.model.context
    batches = [sample_batch(chain.test_text, seed_from_int(900 + i), 32, context) for i in range(TEST_BATCHES)]
    return chain, train_text, TestLoss(chain, batches, genesis_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genesis", type=Path, default=DEVNET)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--block-steps", type=int, default=TrainingConfig.steps)
    parser.add_argument("--scheme", choices=("model", "slice"), default="model")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()
    chain, train_text, test_loss = prepare(args.genesis)
    genesis = chain.genesis
    batches = test_loss.batches
    config = TrainingConfig(steps=args.block_steps, learning_rate=args.learning_rate, scheme=args.scheme)
    largest_slice = max(chain.layout.slice_size(s) for s in range(genesis.partition.slices))

    chain_curve, chain_seconds, counts = run_chain(chain, train_text, args.steps, config, test_loss)
    chain_steps = chain_curve[-1][0]  # whole blocks: may pass args.steps by less than a block
    central_curve, seconds_per_step = run_central(
        genesis.initial_weights(), train_text, chain_steps, config, args.block_steps, test_loss
    )
    equal_compute_steps = chain_seconds / seconds_per_step
    if equal_compute_steps > chain_steps:  # extend the centralized run to the chain's compute
        central_long, _ = run_central(genesis.initial_weights(), train_text, math.ceil(equal_compute_steps),
                                      config, args.block_steps, test_loss)  # fmt: skip
    else:
        central_long = central_curve
    unigram = unigram_loss(train_text, batches)
    chain_final = chain_curve[-1][1]
    central_final = loss_at(central_curve, chain_curve[-1][0])
    central_equal_compute = loss_at(central_long, equal_compute_steps)
    print(json.dumps({
        "scheme": args.scheme,
        "steps": chain_curve[-1][0],
        "block_steps": args.block_steps,
        "slice_fraction": round(largest_slice / genesis.model.parameter_count(), 4),
        "unigram_loss": round(unigram, 4),
        "chain_test_loss": round(chain_final, 4),
        "central_test_loss": round(central_final, 4),
        "loss_reduction_ratio": round((unigram - chain_final) / (unigram - central_final), 4),
        "equal_compute_central_steps": round(equal_compute_steps),
        "central_test_loss_equal_compute": round(central_equal_compute, 4),
        "loss_reduction_ratio_equal_compute": round((unigram - chain_final) / (unigram - central_equal_compute), 4),
        "blocks": counts,
        "chain_seconds": round(chain_seconds, 1),
        "central_seconds_per_step": round(seconds_per_step, 4),
        "chain_curve": [[s, round(v, 4)] for s, v in chain_curve],
        "central_curve": [[s, round(v, 4)] for s, v in central_curve],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
