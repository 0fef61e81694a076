"""The miner: train one slice of the model, in float, from canonical weights.

Every weight outside the slice stays exactly as it was (its gradient is
masked, so Adam never moves it), so only the slice changes when the result
is quantized back to the canonical format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.data import sample_batch
from training.weights import CanonicalWeights, SliceLayout, quantize


@dataclass(frozen=True)
class TrainingConfig:
    """How a miner trains a slice (miner-local: not consensus)."""

    steps: int = 30
    """Optimizer steps per attempt."""
    learning_rate: float = 3e-3
    """Adam learning rate."""
    batch_sequences: int = 16
    """Sequences per training batch."""
    device: str = "cpu"
    """"cpu" or "cuda"."""


def slice_masks(layout: SliceLayout, slice_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """1 where an element belongs to the slice, 0 elsewhere, per tensor."""
    masks = {}
    for name, shape in layout.config.tensor_shapes().items():
        mask = torch.zeros(int(np.prod(shape)), device=device)
        mask[torch.tensor(layout.indices[slice_id][name], device=device)] = 1.0
        masks[name] = mask.view(shape)
    return masks


def train_slice(
    weights: CanonicalWeights,
    layout: SliceLayout,
    slice_id: int,
    train_text: bytes,
    seed: bytes,
    config: TrainingConfig,
) -> np.ndarray:
    """The slice's new canonical values after `config.steps` Adam steps on
    training batches drawn with `seed` (batch i uses seed || i)."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    model = weights.to_model().to(device)
    masks = slice_masks(layout, slice_id, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for step in range(config.steps):
        inputs, targets = sample_batch(
            train_text, seed + step.to_bytes(4, "big"), config.batch_sequences, weights.config.context
        )
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(inputs.to(device), targets.to(device))
        loss.backward()  # type: ignore[no-untyped-call]
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None
            parameter.grad.mul_(masks[name])
        optimizer.step()
    state = model.state_dict()
    trained = weights.replace({name: quantize(state[name], weights.exponents[name]) for name in weights.tensors})
    return layout.extract(trained, slice_id)
