"""The miner: train the model in float, publish the assigned slice.

A miner keeps a local float model and its AdamW state across blocks (miner
state, not consensus data; `state_bytes` is what its caller saves). For each
block it

1. rebases onto the chain: every slice the chain changed since it last looked
   moves by the chain's change, measured from the values the miner offered for
   it when the chain settled its offer (`published`), else from the values it
   last took, so the local model takes the others' progress and keeps its own
   (docs/spec.md, section 18);
2. trains for `steps` optimizer steps on training batches drawn from the
   block's training seed (batch i uses seed || i, so anyone can replay it);
3. quantizes the local model and returns the assigned slice's values.

Two schemes (measured in docs/benchmarks.md):
- "model": the local model trains every weight; the published slice carries
  the slice's share of that progress and the rest stays local for later blocks.
- "slice": only the assigned slice trains (gradients of other weights are
  masked), after taking the chain's weights for every slice.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from training.data import sample_batch
from training.model import GPT
from training.weights import CanonicalWeights, SliceLayout, dequantize, quantize

Scheme = Literal["model", "slice"]


@dataclass(frozen=True)
class TrainingConfig:
    """How a miner trains (miner-local: not consensus)."""

    steps: int = 30
    """Optimizer steps per block (docs/benchmarks.md: 10-30 keep >= 0.96 of
    centralized progress; 30 keeps verification under 5% of production)."""
    learning_rate: float = 3e-3
    """AdamW peak learning rate."""
    warmup_steps: int = 50
    """Linear warm-up from 0, counted over the miner's lifetime."""
    batch_sequences: int = 32
    """Sequences per training batch."""
    scheme: Scheme = "model"
    """"model" (train everything locally) or "slice" (train only the assigned slice)."""
    device: str = "cpu"
    """"cpu" or "cuda" (bf16 autocast on CUDA)."""
    rebase: bool = True
    """On a slice the chain changed: add the chain's change to the local values (keeping the
    miner's own progress since), or, False, take the chain's values (dropping it)."""


@dataclass(frozen=True)
class Work:
    """A slice update ready to be proposed."""

    slice_id: int
    values: np.ndarray
    """The slice's new int16 values, in the slice's element order."""
    steps: int
    """Optimizer steps taken for this block."""
    training_loss: float = math.nan
    """The mean training loss over those steps (nats per token; NaN for none): informative."""


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; use cpu or cuda")
    return device


def slice_masks(layout: SliceLayout, slice_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """1 where an element belongs to the slice, 0 elsewhere, per tensor."""
    masks = {}
    for name, shape in layout.config.tensor_shapes().items():
        mask = torch.zeros(int(np.prod(shape)), device=device)
        mask[torch.tensor(layout.indices[slice_id][name], device=device)] = 1.0
        masks[name] = mask.view(shape)
    return masks


class Miner:
    """A local float model and optimizer that turn blocks' assignments into slice updates."""

    def __init__(self, start: CanonicalWeights, layout: SliceLayout, train_text: bytes, config: TrainingConfig) -> None:
        self.config = config
        self.layout = layout
        self.train_text = train_text
        self.device = resolve_device(config.device)
        self.model: GPT = start.to_model().to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0
        )
        self.steps_done = 0
        self.base: list[np.ndarray | None] = [layout.extract(start, s) for s in range(layout.partition.slices)]
        """Per slice, the values the local model's slice moved on from: the chain's it last
        adopted, or the ones it offered once the chain settled them (None: unknown, after
        loading an older state). The local values minus these are the miner's progress not yet
        offered."""
        self._masks: dict[int, dict[str, torch.Tensor]] = {}

    def adopt(self, chain: CanonicalWeights, everything: bool = False) -> None:
        """Rebase onto the chain's model: each slice it changed since we last looked moves by
        the chain's change (`config.rebase`), or takes the chain's values (without `rebase`,
        with `everything`, in the "slice" scheme, or when the slice's base is unknown)."""
        overwrite = everything or self.config.scheme == "slice" or not self.config.rebase
        with torch.no_grad():
            for slice_id in range(self.layout.partition.slices):
                values = self.layout.extract(chain, slice_id)
                base = self.base[slice_id]
                if base is not None and not overwrite and np.array_equal(values, base):
                    continue
                change = values.astype(np.int32) - base if base is not None and not overwrite else None
                parameters = dict(self.model.named_parameters())
                offset = 0
                for name, index in self.layout.indices[slice_id].items():  # the slice's order
                    parameter = parameters[name]
                    where = torch.tensor(index, device=self.device)
                    exponent = chain.exponents[name]
                    if change is None:  # take the chain's values
                        parameter.view(-1)[where] = dequantize(values[offset : offset + len(index)], exponent).to(
                            self.device
                        )
                    else:  # add the chain's change, keep our progress
                        step = dequantize(change[offset : offset + len(index)], exponent)
                        parameter.view(-1)[where] += step.to(self.device)
                    offset += len(index)
                self.base[slice_id] = values

    def work(self, chain: CanonicalWeights, slice_id: int, seed: bytes) -> Work:
        """Train for one block and return the assigned slice's new values."""
        self.adopt(chain)
        mean_loss = self.train(slice_id, seed)
        return Work(slice_id, self.values(chain, slice_id), self.config.steps, mean_loss)

    def train(self, slice_id: int, seed: bytes) -> float:
        """`config.steps` optimizer steps on the block's batches (the slice's weights only in the
        "slice" scheme); returns their mean training loss (NaN for none)."""
        masks = None
        if self.config.scheme == "slice":
            if slice_id not in self._masks:
                self._masks[slice_id] = slice_masks(self.layout, slice_id, self.device)
            masks = self._masks[slice_id]
        self.model.train()
        losses = [self._train_step(seed + step.to_bytes(4, "big"), masks) for step in range(self.config.steps)]
        return torch.stack(losses).mean().item() if losses else math.nan  # one device sync per round

    def values(self, chain: CanonicalWeights, slice_id: int) -> np.ndarray:
        """The local model's values for a slice, quantized like the chain's (no training):
        when the chain moved on while we trained, the work goes to the slice the new head assigns."""
        state = self.model.state_dict()
        quantized = chain.replace({name: quantize(state[name], chain.exponents[name]) for name in chain.tensors})
        return self.layout.extract(quantized, slice_id)

    def snapshot(self, chain: CanonicalWeights) -> list[np.ndarray]:
        """The local model's values for every slice, quantized like the chain's (no training):
        what a commit-reveal miner commits from while it trains on (p2p/mining.py)."""
        state = self.model.state_dict()
        quantized = chain.replace({name: quantize(state[name], chain.exponents[name]) for name in chain.tensors})
        return [self.layout.extract(quantized, slice_id) for slice_id in range(self.layout.partition.slices)]

    def published(self, slice_id: int, values: np.ndarray) -> None:
        """Record the values we offered for a slice the chain has since settled (applied them,
        combined them with other miners' updates, or applied others' instead: p2p/mining.py
        `find_settled`): the local model's progress beyond them is kept, and the next rebase
        moves the slice by the chain's values less these."""
        self.base[slice_id] = values.astype(np.int16)

    def _train_step(self, seed: bytes, masks: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """One optimizer step; returns its loss (detached, on the device: reading it would wait for it)."""
        config = self.config
        rate = config.learning_rate * min(1.0, (self.steps_done + 1) / max(1, config.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        inputs, targets = self.batch(seed)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.loss(inputs, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        if masks is not None:
            for name, parameter in self.model.named_parameters():
                assert parameter.grad is not None
                parameter.grad.mul_(masks[name])
        self.optimizer.step()
        self.steps_done += 1
        return loss.detach().float()

    def batch(self, seed: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of a step's seed: (inputs, targets) of `config.batch_sequences` sequences."""
        return sample_batch(self.train_text, seed, self.config.batch_sequences, self.model.config.context)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's mean loss on a batch, with a graph for `backward`."""
        return self.model.loss(inputs, targets)

    @property
    def sequences_per_step(self) -> int:
        """Sequences one optimizer step trains on, over every process of the job (one here)."""
        return self.config.batch_sequences

    def state_bytes(self) -> bytes:
        """The miner's state as `load` reads it (a torch archive). The caller writes
        it to disk atomically (chain/files.py; training/ does not import chain/)."""
        buffer = io.BytesIO()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "steps_done": self.steps_done,
                "base": [None if b is None else torch.from_numpy(b.astype(np.int16)) for b in self.base],
            },
            buffer,
        )
        return buffer.getvalue()

    def load(self, path: Path) -> None:
        """Restore state written from `state_bytes` (weights-only unpickling)."""
        self.restore(path.read_bytes())

    def restore(self, state: bytes) -> None:
        """Restore state from `state_bytes`' archive (weights-only unpickling)."""
        saved = torch.load(io.BytesIO(state), map_location=self.device, weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.steps_done = int(saved["steps_done"])
        saved_base = saved.get("base")  # states saved before rebasing kept no base: take the chain's next
        self.base = (
            [None if b is None else b.numpy().astype(np.int16) for b in saved_base]
            if saved_base is not None
            else [None] * self.layout.partition.slices
        )
