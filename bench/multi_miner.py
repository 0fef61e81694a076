"""How much of several miners' work the chain keeps, against what data parallelism could keep.

    python bench/multi_miner.py [--miners 4] [--steps-per-miner 720] [--seeds 0 1]
                                [--key-sets 2] [--rates 1.5e-3 2.1e-3 3e-3 4.2e-3] [--skip-ceiling]
                                [--chain-only] [--miner-rate R] [--key-names NAME ...]
                                [--genesis FILE] [--no-rebase] [--no-settle] [--scheme model|slice]
                                [--local-updates [RATE MOMENTUM ...]] [--threads 1] [--jobs CORES]

One run measures, on the devnet model (docs/benchmarks.md):

1. The chain with N miners, run as the network runs it. At each decided height every miner
   reveals the update it committed in that block as a training block (checked by the rules;
   proposed only if its validation gain meets the difficulty), rebases onto the block's state
   (a slice the height settled moves by the chain's values less the miner's offer for it:
   p2p/mining.py `find_settled`), trains `steps` optimizer steps on its own batches and
   commits its next update (its offer, committed if it gains on the head). The next
   height's proposer names the committed training blocks (at most MAX_TRAINING_PER_HEIGHT),
   and the rules apply the combination that loses least on the proposer's held-out sequences
   (docs/spec.md, section 18). Difficulty as genesis sets it and the rules retarget it
   (heights a target interval apart); every block goes through `DecidedChain.on_decided`.
2. The same chain with one miner, for as many steps as the N miners computed, or until its
   test loss reaches the N-miner chain's final one (where the measure below is read): the floor.
   `useful_work_fraction` = the steps the single miner needs to reach the N-miner chain's
   final test loss / the steps the N miners computed (one miner alone keeps 1/N by this
   measure: N miners that added nothing would need no more of its steps than one miner).
   Items 1 and 2 run for each of `--key-sets` sets of miner keys (miner-0 ... miner-(N-1),
   then miner-N ...: a miner's key fixes its slices and training batches, so a key set is the
   chain's seed, as a data seed is the ceiling's); `useful_work_fraction` is their mean.
3. The data-parallel ceiling: centralized AdamW with each step on N x 32 sequences (the N
   miners' batches averaged into one) for the steps one miner computes, its learning rate
   chosen by a sweep (`--rates`, warm-up scaled to 50 / N steps, the same samples as the
   miners' 50) on the first seed, then run on every seed. `data_parallel_ceiling` = the
   batch-32 centralized steps that reach the same test loss / (N x steps per miner), the mean
   over seeds; the batch-32 run uses the miners' own learning rate and warm-up.
4. With `--local-updates`, a second yardstick with no chain: float local updates in the DiLoCo
   family (N AdamW workers start each round from one global model, train a block's steps on
   their own batches, and the global model takes an outer Nesterov step on their mean change),
   for each outer rate and momentum given, on data seed 0. `local_updates_fraction` reads it as
   the ceiling is read: what the best of them keeps of the steps computed, syncing the whole
   model once a block with no chain at all, where the ceiling syncs every step.

The chains of each key set and the ceiling's runs are independent jobs, run by `--jobs` worker
processes (one a core by default), each training on `--threads` torch threads (1 by default)
with MKL's reproducible code path: at one thread a run repeats bit for bit
(bench/convergence.py `prepare`), so the figures do not depend on how many jobs ran at once.
Prints one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import multiprocessing
import os
import signal
import statistics
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from convergence import TestLoss, decide_height, devnet_shards_of, prepare, run_central

from chain.blocks import DecidedBody, UpdateCommitment
from chain.crypto import PrivateKey, devnet_key
from consensus.decided_chain import DecidedChain
from consensus.rules import Chain, InvalidBlock, compute_next_slice, compute_training_seed, genesis_block, genesis_state
from genesis import DEVNET
from node import validator_keys
from p2p.mining import PreparedUpdate, find_settled, is_carried, prepare_update, reveal_update, validation_gain
from training.data import sample_batch, seed_from_int
from training.miner import Miner, TrainingConfig
from training.weights import CanonicalWeights, from_model

Curve = list[tuple[int, float]]


def mine_network(
    chain: Chain,
    train_text: bytes,
    keys: list[PrivateKey],
    heights: int,
    config: TrainingConfig,
    test_loss: TestLoss,
    stop_at: float | None = None,
    settle: bool = True,
) -> tuple[Curve, dict[str, int]]:
    """The chain mined by one miner per key for `heights` training rounds, commit-reveal as the
    network does it (an update trained on head h is revealed on h + 1 and judged at h + 2; one
    last height judges the last round's); returns the curve (optimizer steps computed by all
    miners, test loss) and counts. With `stop_at`, it stops at the first height whose test loss
    is at or below it (the rest of the curve cannot change where the curve first reaches it)."""
    genesis = chain.genesis
    state = genesis_state(genesis)
    decided = DecidedChain.from_genesis(chain, genesis_block(genesis, state), state)
    validators = validator_keys(genesis)
    shards = devnet_shards_of(genesis, test_loss.genesis_path)
    miners = [Miner(chain.weights(state), chain.layout, train_text, config) for _ in keys]
    prepared: dict[int, PreparedUpdate] = {}
    offered: dict[int, PreparedUpdate] = {}  # this round's updates, committed or not, by miner
    judging: dict[int, PreparedUpdate] = {}  # the previous round's: the height being decided judges them
    revealed: dict[bytes, tuple[int, PreparedUpdate]] = {}
    counts = dict.fromkeys(
        ("not_committed", "reveals_below_difficulty", "revealed", "applied", "heights_with_update", "combined_heights"),
        0,
    )
    curve: Curve = [(0, test_loss(chain.weights(state)))]
    computed = 0
    label = f"{len(keys)} miner{'s' if len(keys) > 1 else ''}"
    for height in range(1, heights + 2):  # one more height reveals and judges the last round's updates
        head = decided.head
        weights = chain.weights(head.state)
        decided.on_tick(head.block.header.timestamp + 1)
        for index, key in enumerate(keys):  # reveal what the head carries a commitment to
            update = prepared.pop(index, None)
            if update is None or not is_carried(head.block, update):
                continue
            block = reveal_update(chain, head.block, head.state, key, update, head.block.header.timestamp + 1)
            print(f"[{label}] height {height}: miner {index} slice {update.slice_id}: validation gain "
                  f"{update.expected_gain} committed (head {height - 2}), {validation_gain(block)} revealed "
                  f"(head {height - 1})", file=sys.stderr)  # fmt: skip
            if validation_gain(block) < head.state.difficulty:
                counts["reveals_below_difficulty"] += 1
                continue
            try:
                decided.on_training_block(block)
            except InvalidBlock as error:
                print(f"[{label}] height {height}: a reveal was refused: {error}", file=sys.stderr)
                continue
            revealed[block.hash] = (index, update)
            counts["revealed"] += 1
        commitments: list[UpdateCommitment] = []
        for index, (key, miner) in enumerate(zip(keys, miners, strict=True)):  # train, commit the next
            if height > heights:
                break
            slice_id = compute_next_slice(head.block.header.height + 1, genesis.partition.slices)
            work = miner.work(weights, slice_id, compute_training_seed(head.block.hash, key.public_key))
            computed += work.steps
            update = prepare_update(chain, head.block, head.state, key, work.values, work.steps)
            if update.expected_gain >= head.state.difficulty:
                prepared[index] = update
                commitments.append(update.commitment)
            else:
                counts["not_committed"] += 1
            offered[index] = update
        decision = decide_height(decided, validators, decided.get_training_candidates(), shards, commitments)
        body = decision.block.body
        assert isinstance(body, DecidedBody)
        for applied in body.applied:
            index, update = revealed.pop(applied)
            if not settle:  # only the applied offers, as miners did before find_settled
                miners[index].published(update.slice_id, np.frombuffer(update.weights, dtype="<i2"))
        for index, update in judging.items() if settle else ():  # the network's rule, applied ones included
            if find_settled({update.height: update}, decision.block, lambda height: None):
                miners[index].published(update.slice_id, np.frombuffer(update.weights, dtype="<i2"))
        judging, offered = offered, {}
        revealed.clear()
        counts["applied"] += len(body.applied)
        counts["heights_with_update"] += bool(body.applied)
        counts["combined_heights"] += len(body.applied) > 1
        curve.append((computed, test_loss(chain.weights(decision.state))))
        print(
            f"[{label}] height {height}/{heights + 1}: {len(body.applied)} of {len(body.training)} named applied, "
            f"{computed} steps, test loss {curve[-1][1]:.4f}",
            file=sys.stderr,
            flush=True,
        )
        if stop_at is not None and curve[-1][1] <= stop_at:
            break
    return curve, counts


def steps_to_reach(curve: Curve, target: float) -> float:
    """The first (interpolated) step count at which a decreasing curve reaches `target`."""
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else float(s0)
    return float("inf")


def data_parallel_ceiling(
    pool: Executor, miners: int, steps_per_miner: int, config: TrainingConfig, rates: list[float], seeds: list[int]
) -> dict[str, object]:
    """The tuned data-parallel yardstick (see the module's docstring); its runs go to `pool`
    (the sweep and the batch-32 runs at once, then the best rate on the other seeds)."""
    total = miners * steps_per_miner
    wide = replace(config, batch_sequences=config.batch_sequences * miners,
                   warmup_steps=max(1, round(config.warmup_steps / miners)))  # fmt: skip
    sweeping = {rate: pool.submit(central_job, steps_per_miner, replace(wide, learning_rate=rate), seeds[0])
                for rate in rates}  # fmt: skip
    narrow_runs = {seed: pool.submit(central_job, total, config, seed) for seed in seeds}
    sweep: dict[float, float] = {}
    for rate, future in sweeping.items():
        sweep[rate] = future.result()[-1][1]
        print(f"[ceiling] learning rate {rate:g}: test loss {sweep[rate]:.4f}", file=sys.stderr, flush=True)
    best = min(sweep, key=lambda rate: sweep[rate])
    wide_runs = {seed: pool.submit(central_job, steps_per_miner, replace(wide, learning_rate=best), seed)
                 for seed in seeds[1:]}  # fmt: skip
    fractions, losses = [], []
    for seed in seeds:
        final = sweep[best] if seed == seeds[0] else wide_runs[seed].result()[-1][1]
        narrow = narrow_runs[seed].result()
        losses.append(final)
        fractions.append(min(steps_to_reach(narrow, final), total) / total)
        print(f"[ceiling] seed {seed}: batch {wide.batch_sequences} reaches {final:.4f}, "
              f"batch {config.batch_sequences} needs {fractions[-1] * total:.0f} steps", file=sys.stderr)  # fmt: skip
    return {
        "data_parallel_ceiling": round(statistics.mean(fractions), 4),
        "ceiling_by_seed": [round(f, 4) for f in fractions],
        "ceiling_learning_rate": best,
        "ceiling_warmup_steps": wide.warmup_steps,
        "ceiling_sweep": {f"{rate:g}": round(loss, 4) for rate, loss in sweep.items()},
        "ceiling_test_loss_by_seed": [round(loss, 4) for loss in losses],
    }


def train_local_updates(
    weights: CanonicalWeights,
    train_text: bytes,
    workers: int,
    rounds: int,
    config: TrainingConfig,
    outer_rate: float,
    outer_momentum: float,
    test_loss: TestLoss,
    data_seed: int = 0,
) -> Curve:
    """Float local updates in the DiLoCo family, with no chain: `workers` AdamW models start each
    round from one global model, train `config.steps` steps on their own batches (each keeps
    its optimizer state), and the global model takes an outer Nesterov step on their mean
    change, rate `outer_rate`, momentum `outer_momentum` (1 and 0: their mean). Returns the
    curve (steps computed by all workers, the global model's test loss) after every round."""
    global_model = weights.to_model()
    models = [weights.to_model() for _ in range(workers)]
    optimizers = [
        torch.optim.AdamW(m.parameters(), lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0) for m in models
    ]
    momentum = [torch.zeros_like(p) for p in global_model.parameters()]
    curve: Curve = [(0, test_loss(weights))]
    step = 0
    for round_index in range(rounds):
        for worker, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            with torch.no_grad():
                for target, source in zip(model.parameters(), global_model.parameters(), strict=True):
                    target.copy_(source)
            for inner in range(config.steps):
                local_step = round_index * config.steps + inner
                rate = config.learning_rate * min(1.0, (local_step + 1) / max(1, config.warmup_steps))
                for group in optimizer.param_groups:
                    group["lr"] = rate
                seed = seed_from_int(((data_seed * workers + worker + 1) << 32) + local_step)
                inputs, targets = sample_batch(train_text, seed, config.batch_sequences, model.config.context)
                optimizer.zero_grad(set_to_none=True)
                model.loss(inputs, targets).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            step += config.steps
        with torch.no_grad():
            locals_ = (m.parameters() for m in models)
            for parameter, buffer, *local in zip(global_model.parameters(), momentum, *locals_, strict=True):
                change = parameter - torch.stack(local).mean(dim=0)  # the outer "gradient"
                buffer.mul_(outer_momentum).add_(change)
                parameter.sub_(outer_rate * (change + outer_momentum * buffer))  # Nesterov
        curve.append((step, test_loss(from_model(global_model, weights.exponents))))
        print(f"[local updates {outer_rate:g}/{outer_momentum:g}] round {round_index + 1}/{rounds}, {step} steps, "
              f"test loss {curve[-1][1]:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    return curve


def local_update_yardstick(
    pool: Executor, miners: int, steps_per_miner: int, config: TrainingConfig, outers: list[tuple[float, float]]
) -> dict[str, object]:
    """What float local updates synced every block's steps keep (`train_local_updates`, data seed
    0, each outer setting), read as the ceiling is: the batch-32 centralized steps that reach
    their final test loss, over the steps the workers computed."""
    total = miners * steps_per_miner
    rounds = steps_per_miner // config.steps
    narrowing = pool.submit(central_job, total, config, 0)  # first: the pool runs jobs in order
    runs = {outer: pool.submit(local_updates_job, miners, rounds, config, *outer) for outer in outers}
    narrow = narrowing.result()
    fractions: dict[str, float] = {}
    losses: dict[str, float] = {}
    for (rate, momentum), future in runs.items():
        name = f"{rate:g}/{momentum:g}"
        losses[name] = future.result()[-1][1]
        fractions[name] = round(min(steps_to_reach(narrow, losses[name]), total) / total, 4)
        print(f"[local updates {name}] reaches {losses[name]:.4f}: {fractions[name]} of the steps computed",
              file=sys.stderr)  # fmt: skip
    return {
        "local_updates_fraction": max(fractions.values()),
        "local_updates_by_outer_step": fractions,
        "local_updates_test_loss": {name: round(loss, 4) for name, loss in losses.items()},
    }


PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when its parent dies."""

_prepared: tuple[Chain, bytes, TestLoss] | None = None
"""A worker process's chain, training text and test-loss probe (`start_worker`)."""


def start_worker(genesis_path: Path, threads: int) -> None:
    """A pool worker's start: the chain and data, float training on `threads` threads. On
    Linux the worker gets SIGTERM when the bench's process dies (a stopped bench left its
    workers training for an hour)."""
    global _prepared
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the workers end after their current job
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prepared = prepare(genesis_path, threads=threads)


def prepared() -> tuple[Chain, bytes, TestLoss]:
    assert _prepared is not None, "a job ran outside a started worker"
    return _prepared


def central_job(steps: int, config: TrainingConfig, data_seed: int) -> Curve:
    """Centralized AdamW from the genesis model (`run_central`), evaluated every block's steps."""
    chain, train_text, test_loss = prepared()
    curve, _ = run_central(chain.genesis.initial_weights(), train_text, steps, config, config.steps, test_loss,
                           data_seed=data_seed)  # fmt: skip
    return curve


def local_updates_job(workers: int, rounds: int, config: TrainingConfig, rate: float, momentum: float) -> Curve:
    """Float local updates from the genesis model (`train_local_updates`), data seed 0."""
    chain, train_text, test_loss = prepared()
    return train_local_updates(chain.genesis.initial_weights(), train_text, workers, rounds, config, rate, momentum,
                               test_loss)  # fmt: skip


def key_set_job(names: list[str], heights: int, config: TrainingConfig, settle: bool) -> dict[str, object]:
    chain, train_text, test_loss = prepared()
    return measure_key_set(chain, train_text, names, heights, config, test_loss, settle)


def measure_key_set(
    chain: Chain,
    train_text: bytes,
    names: list[str],
    heights: int,
    config: TrainingConfig,
    test_loss: TestLoss,
    settle: bool = True,
) -> dict[str, object]:
    """The N-miner chain and its single-miner floor for one set of miner keys (their keys fix
    their slices and training batches: a set of keys is the chain's seed)."""
    keys = [devnet_key(name) for name in names]
    racing, counts = mine_network(chain, train_text, keys, heights, config, test_loss, settle=settle)
    computed = racing[-1][0]
    single, _ = mine_network(chain, train_text, keys[:1], heights * len(keys), config, test_loss, racing[-1][1], settle)
    equivalent = steps_to_reach(single, racing[-1][1])
    return {
        "key_names": names,
        "steps_computed": computed,
        "chain_test_loss": round(racing[-1][1], 4),
        "single_miner_test_loss": round(single[-1][1], 4),  # where it stopped: at the N miners' or after as many steps
        "single_miner_steps_to_same_loss": None if equivalent == float("inf") else round(equivalent),
        "useful_work_fraction": round(min(equivalent, computed) / computed, 4),
        "blocks": counts,
        "chain_curve": [[s, round(v, 4)] for s, v in racing],
        "single_miner_curve": [[s, round(v, 4)] for s, v in single],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genesis", type=Path, default=DEVNET)
    parser.add_argument("--miners", type=int, default=4)
    parser.add_argument("--steps-per-miner", type=int, default=720, help="optimizer steps each miner computes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data seeds of the ceiling")
    parser.add_argument("--key-sets", type=int, default=2, help="sets of miner keys the chains run with (0: the "
                        "ceiling only)")  # fmt: skip
    parser.add_argument("--rates", type=float, nargs="+", default=[1.5e-3, 2.1e-3, 3e-3, 4.2e-3])
    parser.add_argument("--no-rebase", action="store_true", help="miners take the chain's values instead")
    parser.add_argument("--no-settle", action="store_true", help="miners whose offers lost keep their progress on the "
                        "slice, as miners did before find_settled")  # fmt: skip
    parser.add_argument("--skip-ceiling", action="store_true", help="measure the chains only")
    parser.add_argument("--chain-only", action="store_true", help="measure the N-miner chain only (its curve)")
    parser.add_argument("--miner-rate", type=float, default=None, help="the miners' learning rate (default: theirs)")
    parser.add_argument("--scheme", choices=("model", "slice"), default=TrainingConfig.scheme,
                        help="what a miner trains: every weight, or only its assigned slice")  # fmt: skip
    parser.add_argument("--key-names", nargs="+", default=None, help="the miners' devnet keys (one set; default: "
                        "miner-0 ... miner-(N-1), then miner-N ... for the next set)")  # fmt: skip
    parser.add_argument("--local-updates", type=float, nargs="*", default=None, metavar="RATE,MOMENTUM",
                        help="also measure float local updates synced every block (outer step settings, "
                        "e.g. 1 0 0.7 0.9; no values: those two)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (runs repeat bit for bit at 1)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: one a core)")
    args = parser.parse_args()
    config = TrainingConfig(rebase=not args.no_rebase, scheme=args.scheme)
    if args.miner_rate is not None:
        config = replace(config, learning_rate=args.miner_rate)
    heights = args.steps_per_miner // config.steps
    if args.key_names is not None and len(args.key_names) != args.miners:
        raise SystemExit(f"--key-names: got {len(args.key_names)} names, want {args.miners} (--miners)")
    key_sets = (
        [args.key_names]
        if args.key_names is not None
        else [[f"miner-{k * args.miners + i}" for i in range(args.miners)] for k in range(args.key_sets)]
    )

    if args.chain_only:
        chain, train_text, test_loss = prepare(args.genesis, threads=args.threads)
        keys = [devnet_key(name) for name in key_sets[0]]
        racing, counts = mine_network(chain, train_text, keys, heights, config, test_loss, settle=not args.no_settle)
        print(json.dumps({"miners": args.miners, "key_names": key_sets[0], "learning_rate": config.learning_rate,
                          "blocks": counts, "chain_curve": [[s, round(v, 4)] for s, v in racing]}))  # fmt: skip
        return
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked mid-use
    with ProcessPoolExecutor(args.jobs, spawn, start_worker, (args.genesis, args.threads)) as pool:
        chains = [pool.submit(key_set_job, names, heights, config, not args.no_settle) for names in key_sets]
        ceiling = (
            None
            if args.skip_ceiling
            else data_parallel_ceiling(pool, args.miners, heights * config.steps, config, args.rates, args.seeds)
        )
        local = None
        if args.local_updates is not None:
            values = args.local_updates or [1.0, 0.0, 0.7, 0.9]
            if len(values) % 2:
                raise SystemExit("--local-updates: give outer rate and momentum in pairs")
            outers = list(zip(values[::2], values[1::2], strict=True))
            local = local_update_yardstick(pool, args.miners, heights * config.steps, config, outers)
        measured = [future.result() for future in chains]
    fractions = [float(m["useful_work_fraction"]) for m in measured]  # type: ignore[arg-type]
    result: dict[str, object] = {
        "miners": args.miners,
        "heights": heights,
        "steps_per_block": config.steps,
        "rebase": config.rebase,
        "scheme": config.scheme,
        "learning_rate": config.learning_rate,
        "threads": args.threads,
        "useful_work_fraction": round(statistics.mean(fractions), 4) if fractions else None,
        "useful_work_by_key_set": fractions,
        "chain_test_loss_by_key_set": [m["chain_test_loss"] for m in measured],
        "single_miner_floor": round(1 / args.miners, 4),
    }
    if ceiling is not None:
        result |= ceiling
    if local is not None:
        result |= local
    if ceiling is not None and fractions:
        of_ceiling = float(result["useful_work_fraction"]) / float(ceiling["data_parallel_ceiling"])  # type: ignore[arg-type]
        result["useful_work_of_ceiling"] = round(of_ceiling, 4)
    result["key_sets"] = measured
    print(json.dumps(result))


if __name__ == "__main__":
    main()
