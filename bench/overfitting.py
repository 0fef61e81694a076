"""Which update each choice rule applies when an overfitting miner races an honest one.

    python bench/overfitting.py [--seeds 1 2 3] [--heights 24] [--steps 30]

Two miners with the same compute race at every height, from the same parent
state, for the same slice: the honest miner trains on the training split, the
overfitter on the validation split (public, and where every training block's
validation batch comes from: what maximizes its validation gain now that the
batch is fixed only after its commitment, docs/spec.md section 17.2). Each
update's validation gain is measured as the chain measures it, on the batch
seeded by the parent and the miner; its held-out gain on `test_sequences`
sequences of the test split picked by the height (standing in for the
proposer's revealed shard sequences). Losses are the float model's mean
nats per byte on those batches (the chain's integer program computes the
same loss to within its rounding, docs/spec.md section 5; float keeps the
bench fast enough for several seeds).

The chain follows the protocol's rule (the larger held-out gain, if positive,
section 17.3). At every height the bench also records what the validation-gain
rule the chain used before held-out tests would have applied. It prints JSON
per seed and in total:

- `overfitter_larger_validation_gain`: heights where the overfitter's update
  had the larger validation gain;
- `validation_rule_overfit`: of those, heights where its held-out gain was
  the smaller one (a validation-gain rule applies an update that generalizes
  worse);
- `heldout_rule_overfit`: heights where the held-out rule applied the
  overfitter's update although the honest one gained more out of sample
  (0 by construction of the rule: what the bench checks is the measurement,
  the next lines are the finding);
- `overfitter_applied`: heights the overfitter's update was applied (by a
  larger held-out gain);
- per height: both gains of both updates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chain.crypto import devnet_key
from consensus.genesis import Genesis
from consensus.rules import Chain, compute_training_seed, compute_validation_seed, genesis_state
from genesis import DEVNET, chunk_directory, load_genesis
from node import tune_memory_allocator
from training.data import load_split, sample_batch
from training.miner import Miner, TrainingConfig
from training.weights import CanonicalWeights


@dataclass(frozen=True)
class Texts:
    train: bytes
    """The training split (the honest miner's text)."""
    validation: bytes
    """The validation split (the overfitter's text, and the validation batches')."""
    test: bytes
    """The test split (the held-out sequences)."""


def float_loss(weights: CanonicalWeights, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean loss (nats per byte) of the weights' float model on a batch."""
    model = weights.to_model()
    model.eval()
    with torch.no_grad():
        return float(model.loss(*batch))


def race(genesis: Genesis, texts: Texts, seed: int, heights: int, config: TrainingConfig) -> dict[str, Any]:
    """One seed: `heights` heights of the overfitter racing the honest miner; the counts and rows."""
    chain = Chain(genesis, texts.validation, texts.test)
    layout = chain.layout
    weights = chain.weights(genesis_state(genesis))
    keys = {"honest": devnet_key(f"overfitting-bench-honest-{seed}"),
            "overfitter": devnet_key(f"overfitting-bench-overfitter-{seed}")}  # fmt: skip
    miners = {"honest": Miner(weights, layout, texts.train, config),
              "overfitter": Miner(weights, layout, texts.validation, config)}  # fmt: skip
    context = genesis.model.context
    evaluation = genesis.evaluation
    rows = []
    parent = hashlib.sha256(b"potchain/bench/overfitting" + seed.to_bytes(8, "big")).digest()
    for height in range(1, heights + 1):
        slice_id = height % genesis.partition.slices
        heldout = sample_batch(texts.test, parent, evaluation.test_sequences, context)
        heldout_before = float_loss(weights, heldout)
        row: dict[str, Any] = {"height": height}
        candidates: dict[str, CanonicalWeights] = {}
        for name, miner in miners.items():
            work = miner.work(weights, slice_id, compute_training_seed(parent, keys[name].public_key))
            slices = [layout.extract(weights, index) for index in range(genesis.partition.slices)]
            slices[slice_id] = work.values
            candidate = layout.assemble(genesis.exponents, slices)
            batch = sample_batch(texts.validation, compute_validation_seed(parent, keys[name].public_key),
                                 evaluation.validation_sequences, context)  # fmt: skip
            validation_gain = float_loss(weights, batch) - float_loss(candidate, batch)
            heldout_gain = heldout_before - float_loss(candidate, heldout)
            row[name] = {"validation_gain": round(validation_gain, 5), "heldout_gain": round(heldout_gain, 5)}
            candidates[name] = candidate
        honest, overfitter = row["honest"], row["overfitter"]
        by_validation = "overfitter" if overfitter["validation_gain"] > honest["validation_gain"] else "honest"
        best = "overfitter" if overfitter["heldout_gain"] > honest["heldout_gain"] else "honest"
        applied = best if row[best]["heldout_gain"] > 0 else None
        row["validation_rule_picks"], row["applied"] = by_validation, applied
        rows.append(row)
        print(f"[overfitting] seed {seed} height {height}: validation gains honest {honest['validation_gain']} "
              f"overfitter {overfitter['validation_gain']}; held-out gains honest {honest['heldout_gain']} "
              f"overfitter {overfitter['heldout_gain']}; applied {applied}", file=sys.stderr, flush=True)  # fmt: skip
        if applied is not None:
            weights = candidates[applied]
            for name, miner in miners.items():
                if name == applied:
                    miner.published(slice_id, layout.extract(weights, slice_id))
        parent = hashlib.sha256(parent + height.to_bytes(8, "big")).digest()
    return {"seed": seed, **count(rows), "heights": rows}


def count(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The counts described in the module docstring."""
    larger_validation = [r for r in rows if r["validation_rule_picks"] == "overfitter"]
    return {
        "contests": len(rows),
        "overfitter_larger_validation_gain": len(larger_validation),
        "validation_rule_overfit": sum(
            1 for r in larger_validation if r["overfitter"]["heldout_gain"] < r["honest"]["heldout_gain"]
        ),
        "heldout_rule_overfit": sum(
            1 for r in rows
            if r["applied"] == "overfitter" and r["honest"]["heldout_gain"] > r["overfitter"]["heldout_gain"]
        ),
        "overfitter_applied": sum(1 for r in rows if r["applied"] == "overfitter"),
        "honest_applied": sum(1 for r in rows if r["applied"] == "honest"),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--heights", type=int, default=24)
    parser.add_argument("--steps", type=int, default=TrainingConfig.steps, help="optimizer steps per update")
    parser.add_argument("--genesis", type=Path, default=DEVNET)
    args = parser.parse_args()
    tune_memory_allocator()
    torch.manual_seed(0)
    genesis = load_genesis(args.genesis)
    directory = chunk_directory(args.genesis, genesis)
    texts = Texts(*(load_split(genesis.dataset, directory, split) for split in ("train", "validation", "test")))
    config = TrainingConfig(steps=args.steps)
    started = time.perf_counter()
    runs = [race(genesis, texts, seed, args.heights, config) for seed in args.seeds]
    total = count([row for run in runs for row in run["heights"]])
    print(json.dumps({"steps": args.steps, "heights": args.heights, "seeds": args.seeds, **total,
                      "seconds": round(time.perf_counter() - started, 1), "runs": runs}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
