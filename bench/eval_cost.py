"""Cost of one canonical evaluation relative to a float32 forward pass.

    python bench/eval_cost.py [--genesis genesis/devnet.json] [--repeats 20]

Both run in this process on the same model (the genesis weights), the same
validation batch and the same threads; each figure is the median of
`--repeats` timed runs after warm-up, the two alternating; ratios are
medians of per-pair ratios. Prints one JSON object;
`canonical_over_float32` (the node's default backend) is the figure of merit (target <= 2.0 on the devnet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from genesis import DEVNET, chunk_directory, load_genesis
from node import tune_memory_allocator
from training.data import load_split, sample_batch, seed_from_int
from training.evaluate import CanonicalEvaluator, default_backend, make_backend


def paired_seconds(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int
) -> tuple[float, float, float]:
    """Median baseline and candidate times and the median of their per-pair ratios.

    Runs alternate (baseline, candidate, baseline, ...) so that drift in the
    machine's speed affects both sides of each pair alike.
    """
    for _ in range(3):
        baseline()
        candidate()
    base_times, candidate_times, ratios = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        candidate()
        ended = time.perf_counter()
        base_times.append(middle - started)
        candidate_times.append(ended - middle)
        ratios.append((ended - middle) / (middle - started))
    return statistics.median(base_times), statistics.median(candidate_times), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genesis", type=Path, default=DEVNET)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    tune_memory_allocator()  # as the node does

    genesis = load_genesis(args.genesis)
    text = load_split(genesis.dataset, chunk_directory(args.genesis, genesis), "validation")
    sequences = genesis.evaluation.validation_sequences
    inputs, targets = sample_batch(text, seed_from_int(7), sequences, genesis.model.context)
    weights = genesis.initial_weights()
    model = weights.to_model().to(args.device).eval()
    float_inputs, float_targets = inputs.to(args.device), targets.to(args.device)

    def float32_forward() -> None:
        """The same task in float32: per-token losses of the batch."""
        with torch.no_grad():
            logits = model(float_inputs)
            losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), float_targets.reshape(-1), reduction="none")
            losses.sum().item()

    figures: dict[str, object] = {
        "genesis": genesis.chain_id,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "tokens": inputs.numel(),
    }
    default = default_backend(args.device)
    backends = ["cpu-fused", "torch-f64", "torch-int64"] if args.device == "cpu" else ["torch-f64"]
    for backend in backends:
        evaluator = CanonicalEvaluator(weights, genesis.tables(), make_backend(backend, args.device))
        repeats = args.repeats if backend != "torch-int64" else max(3, args.repeats // 4)
        float32, seconds, ratio = paired_seconds(
            float32_forward, partial(evaluator.per_token_losses, inputs, targets), repeats
        )
        figures[f"{backend}_seconds"] = round(seconds, 5)
        figures[f"{backend}_over_float32"] = round(ratio, 3)
        if backend == default:
            figures["float32_seconds"] = round(float32, 5)
            figures["canonical_backend"] = backend
            figures["canonical_over_float32"] = round(ratio, 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
