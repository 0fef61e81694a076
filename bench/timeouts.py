"""The voting timeouts genesis fixes, against the evaluation cost measured here.

    python bench/timeouts.py [--genesis genesis/testnet.json] [--warmup 1] [--repeats 2]

For each genesis file (default: the devnet's and the testnet's), times one
canonical evaluation as a node runs it (`consensus.rules.Chain.loss` with
the node's default backend and threads, memo cleared, alternating two
states so that every run also assembles the weights and builds the
evaluator, and alternating the validation and test batches). Cold is the
process's first evaluation of that model (tables, kernel compilation or
their cache); warm the median of `--repeats` runs after `--warmup` more.
Prints one JSON object per genesis: the measured milliseconds (with the
process's CPU time of a warm run, and the 1-minute load average before and
after: on a shared machine other work inflates the figures, so run it
idle), the timeouts `consensus.genesis.compute_timeouts` derives from the
warm figure (with genesis/build.py's network figures), the timeouts the
genesis file holds, and the ratios:

- `measured_over_recorded`: the warm evaluation here over the figure
  genesis/build.py recorded for the network (its reference machine, 2 cores);
- `genesis_over_needed`: the genesis file's propose timeout over the one this
  machine's evaluation cost needs (>= 1: this machine fits the genesis's
  round-0 timeouts; below 1 its rounds decide only once the increment has
  made up the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from chain.state import State
from consensus.genesis import compute_timeouts
from consensus.rules import Chain, genesis_state
from genesis import DEVNET, TESTNET, chunk_directory, load_genesis
from genesis.build import NETWORK_MS, NETWORKS, transfer_ms
from node import tune_memory_allocator
from training.data import load_split, seed_from_int

TIMEOUT_FIELDS = ("timeout_propose_ms", "timeout_prevote_ms", "timeout_precommit_ms", "timeout_increment_ms")


def perturbed(state: State) -> State:
    """The state with one weight of slice 0 changed by 1: another model to evaluate."""
    values = np.frombuffer(state.slices[0], dtype="<i2").copy()
    values[0] += 1 if values[0] < 0 else -1
    return replace(state, slices=(values.astype("<i2").tobytes(), *state.slices[1:]))


def measure(path: Path, warmup: int, repeats: int) -> dict[str, object]:
    genesis = load_genesis(path)
    directory = chunk_directory(path, genesis)
    chain = Chain(
        genesis,
        validation_text=load_split(genesis.dataset, directory, "validation"),
        test_text=load_split(genesis.dataset, directory, "test"),
    )
    first = genesis_state(genesis)
    states = (first, perturbed(first))
    load_before = os.getloadavg()[0]
    times: list[float] = []
    cpu_times: list[float] = []
    for run in range(1 + warmup + repeats):
        chain.forget_losses()
        split = ("validation", "test")[run % 2]
        started, cpu_started = time.perf_counter(), time.process_time()
        chain.loss(states[run % 2], split, seed_from_int(run))
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    cold_ms = round(times[0] * 1000)
    warm = [round(seconds * 1000) for seconds in times[1 + warmup :]]
    warm_ms = round(statistics.median(warm))
    warm_cpu_ms = round(statistics.median(cpu_times[1 + warmup :]) * 1000)

    network = next(name for name, spec in NETWORKS.items() if spec.chain_id == genesis.chain_id)
    spec = NETWORKS[network]
    recorded_ms = spec.evaluation_ms
    transfer = transfer_ms(spec.config, spec.slices)
    needed = compute_timeouts(warm_ms, NETWORK_MS, transfer)
    consensus = genesis.consensus
    held = {name: getattr(consensus, name) for name in TIMEOUT_FIELDS}
    tokens = genesis.model.context * max(genesis.evaluation.validation_sequences, genesis.evaluation.test_sequences)
    return {
        "genesis": genesis.chain_id,
        "backend": chain.backend,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "cold_ms": cold_ms,
        "warm_ms": warm_ms,
        "warm_runs_ms": warm,
        "warm_cpu_ms": warm_cpu_ms,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "recorded_evaluation_ms": recorded_ms,
        "network_ms": NETWORK_MS,
        "transfer_ms": transfer,
        "derived_here": needed,
        "genesis_holds": held,
        "derived_from_recorded": compute_timeouts(recorded_ms, NETWORK_MS, transfer),
        "measured_over_recorded": round(warm_ms / recorded_ms, 3),
        "genesis_over_needed": round(held["timeout_propose_ms"] / needed["timeout_propose_ms"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genesis", type=Path, action="append", help="genesis file (repeatable; default both)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after the cold one")
    parser.add_argument("--repeats", type=int, default=2, help="timed warm runs (the median is reported)")
    args = parser.parse_args()
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    tune_memory_allocator()  # as the node does
    for path in args.genesis or [DEVNET, TESTNET]:
        print(json.dumps(measure(path, args.warmup, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
