"""How much of a miner's time is useful training, and how cheap verification is.

    python bench/useful_work.py [--steps 30] [--repeats 3] [--device cpu|cuda]

In one run, on the same model, batch size and device:

- `miner_over_plain`: the miner's training throughput (tokens per second,
  for a whole block: adopting the chain's weights, training, quantizing,
  extracting the slice) over a plain PyTorch AdamW loop's;
- `verify_over_produce`: the time a node spends validating a training block
  (every check of the rules, with its two canonical evaluations, on a fresh
  node with nothing cached) over the time the miner spent producing it
  (training plus its proof).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from chain.crypto import devnet_key
from consensus.proposals import propose_training_block
from consensus.rules import (
    Chain,
    apply_training_block,
    compute_assigned_slice,
    compute_training_seed,
    genesis_block,
    genesis_state,
)
from genesis import DEVNET, chunk_directory, load_genesis
from node import tune_memory_allocator
from training.data import load_split, sample_batch
from training.miner import Miner, TrainingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genesis", type=Path, default=DEVNET)
    parser.add_argument("--steps", type=int, default=TrainingConfig.steps, help="optimizer steps per block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    tune_memory_allocator()
    torch.manual_seed(0)

    genesis = load_genesis(args.genesis)
    directory = chunk_directory(args.genesis, genesis)
    validation = load_split(genesis.dataset, directory, "validation")
    test = load_split(genesis.dataset, directory, "test")
    train_text = load_split(genesis.dataset, directory, "train")
    chain = Chain(genesis, validation, test)
    state = genesis_state(genesis)
    parent = genesis_block(genesis, state)
    weights = chain.weights(state)
    key = devnet_key("miner-0")
    slice_id = compute_assigned_slice(parent.header, genesis.partition.slices)
    seed = compute_training_seed(parent.hash, key.public_key)
    config = TrainingConfig(steps=args.steps, device=args.device)
    tokens = args.steps * config.batch_sequences * genesis.model.context
    device = torch.device(args.device)

    def plain_loop() -> None:
        model = weights.to_model().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.99))
        for step in range(args.steps):
            inputs, targets = sample_batch(train_text, seed + step.to_bytes(4, "big"), config.batch_sequences, 128)
            optimizer.zero_grad(set_to_none=True)
            model.loss(inputs.to(device), targets.to(device)).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    plain_times, miner_times, produce_times, verify_times = [], [], [], []
    for repeat in range(args.repeats + 1):
        started = time.perf_counter()
        plain_loop()
        plain = time.perf_counter() - started

        miner = Miner(weights, chain.layout, train_text, config)
        started = time.perf_counter()
        work = miner.work(weights, slice_id, seed)
        trained = time.perf_counter() - started
        producer = Chain(genesis, validation, test)
        block = propose_training_block(producer, parent, state, key, work.values, genesis.timestamp + 10, work.steps)
        produced = time.perf_counter() - started

        verifier = Chain(genesis, validation, test)  # a fresh node: nothing cached
        started = time.perf_counter()
        apply_training_block(state, parent, block, verifier)
        verified = time.perf_counter() - started
        if repeat:  # the first round warms up
            plain_times.append(plain)
            miner_times.append(trained)
            produce_times.append(produced)
            verify_times.append(verified)

    plain, trained = statistics.median(plain_times), statistics.median(miner_times)
    produced, verified = statistics.median(produce_times), statistics.median(verify_times)
    print(json.dumps({
        "device": args.device,
        "threads": torch.get_num_threads(),
        "steps_per_block": args.steps,
        "tokens_per_block": tokens,
        "plain_tokens_per_second": round(tokens / plain),
        "miner_tokens_per_second": round(tokens / trained),
        "miner_over_plain": round(plain / trained, 3),
        "produce_seconds": round(produced, 3),
        "verify_seconds": round(verified, 4),
        "verify_over_produce": round(verified / produced, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
