"""Centralized training: the yardstick the chain's training is measured against.

The same model, optimizer, schedule and batch size as the reference miner
(`training/miner.py`), every step on every weight, batch `i` drawn with
`seed_from_int(i)` from the training split. `evaluate` is called with the
canonical weights every `every` steps and at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from training.data import sample_batch, seed_from_int
from training.miner import TrainingConfig
from training.weights import CanonicalWeights, from_model


def train_centralized(
    weights: CanonicalWeights,
    train_text: bytes,
    steps: int,
    config: TrainingConfig,
    every: int,
    evaluate: Callable[[CanonicalWeights], float],
    progress: Callable[[int, float], None] | None = None,
    data_seed: int = 0,
) -> tuple[list[tuple[int, float]], float]:
    """Returns the curve [(steps, evaluate(weights))] from step 0, and the seconds per step.
    `data_seed` 0 draws batch i with `seed_from_int(i)`; another draws other batches."""
    model = weights.to_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    curve = [(0, evaluate(weights))]
    training_seconds = 0.0
    for step in range(steps):
        started = time.perf_counter()
        rate = config.learning_rate * min(1.0, (step + 1) / max(1, config.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = rate
        seed = seed_from_int(step) if data_seed == 0 else seed_from_int((data_seed << 32) + step)
        inputs, targets = sample_batch(train_text, seed, config.batch_sequences, model.config.context)
        optimizer.zero_grad(set_to_none=True)
        model.loss(inputs, targets).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        training_seconds += time.perf_counter() - started
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(from_model(model, weights.exponents))))
            if progress is not None:
                progress(step + 1, curve[-1][1])
    return curve, training_seconds / max(1, steps)
