"""One miner on several processes (GPUs, hosts) with PyTorch's DistributedDataParallel.

`potchain mine --nproc N` (or torchrun, across hosts; docs/node.md) starts N processes.
Each holds the same float model and AdamW state, wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA). For each optimizer step, the batch is the N x
batch_sequences sequences `training.data.sample_batch` draws from the step's seed, split
in rank order: rank r trains on sequences [r * batch_sequences, (r + 1) * batch_sequences).
DDP averages the gradients across the processes, so every process takes the same step:
the one a single process takes on the whole batch (to float rounding).

Rank 0 is the miner the chain sees: it fetches work, adopts the chain's weights, commits
and reveals. It starts each training round on every rank with torch.distributed
broadcasts (the round's slice and seed, then its parameters); the other ranks `follow`
until rank 0 `release`s them. Nothing here talks to the chain.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from training.data import batch_offsets
from training.miner import Miner, TrainingConfig
from training.model import GPT
from training.weights import CanonicalWeights, SliceLayout


@dataclass(frozen=True)
class Placement:
    """Where this process sits in a launched job (from torchrun's environment variables)."""

    rank: int
    """0 .. world_size - 1 across all hosts; rank 0 talks to the chain."""
    world_size: int
    """Processes in the job."""
    local_rank: int
    """This process's index on its host (its GPU on a CUDA host)."""
    local_world_size: int
    """Processes of the job on this host."""


def launched() -> Placement | None:
    """This process's placement when torchrun (or `launch`) started it as one of several, else None."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Placement(int(os.environ["RANK"]), world_size, local_rank, local_world_size)


def join(placement: Placement, device: str) -> str:
    """Join the job's process group (nccl on CUDA, gloo on CPU; the rendezvous torchrun set up
    in the environment); returns this process's device: its own GPU on a CUDA host."""
    if device == "cuda":
        torch.cuda.set_device(placement.local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{placement.local_rank}"
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    dist.init_process_group("gloo")
    return "cpu"


LEAVE_TIMEOUT = timedelta(seconds=60)
"""How long a CPU process waits at the leaving barrier for the others (a dead one never comes)."""


def leave() -> None:
    """Leave the process group (each process, once its mining is over). On gloo the processes
    meet at a bounded barrier first: one that tore the group down while another still used it
    made that one abort ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # a process that failed or left already
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
    dist.destroy_process_group()


def launch(processes: int, entrypoint: Callable[..., Any], *arguments: Any) -> Any:
    """`entrypoint(*arguments)` in `processes` processes on this host, started by torch's elastic
    launcher as `torchrun --standalone --nproc-per-node PROCESSES` starts them; returns rank 0's
    result. `entrypoint` must be a module-level function (the processes are spawned)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 2:
        raise ValueError(f"processes: got {processes}, want at least 2")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    results = cast(dict[int, Any], elastic_launch(config, entrypoint)(*arguments))
    return results[0]


def shard_batch(
    text: bytes, seed: bytes, sequences: int, length: int, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s share of the batch of `sequences * world_size` sequences that `sample_batch`
    draws from `seed`: its sequences [rank * sequences, (rank + 1) * sequences), as (inputs, targets)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: got {rank}, want 0 .. {world_size - 1}")
    offsets = batch_offsets(seed, sequences * world_size, length + 1, len(text))
    data = np.frombuffer(text, dtype=np.uint8)
    mine = offsets[rank * sequences : (rank + 1) * sequences]
    windows = torch.from_numpy(np.stack([data[start : start + length + 1] for start in mine]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


class LossOf(torch.nn.Module):
    """A model whose forward is its mean loss: what DistributedDataParallel wraps (gradients are
    averaged across processes only for a forward that runs through the wrapper)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(inputs, targets)


class DistributedMiner(Miner):
    """A `Miner` whose training steps run on every process of a job, each on its share of the
    batch (the effective batch is world size x `config.batch_sequences` sequences). Rank 0 calls
    `work` as a single-process miner does; the other ranks call `follow`. Every process must
    construct it (and call `synchronize`) together: those are collectives."""

    def __init__(self, start: CanonicalWeights, layout: SliceLayout, train_text: bytes, config: TrainingConfig) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedMiner: join the process group first (training.distributed.join)")
        super().__init__(start, layout, train_text, config)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.parallel = DistributedDataParallel(LossOf(self.model), device_ids=device_ids)

    @property
    def sequences_per_step(self) -> int:
        """Sequences one optimizer step trains on across the job: every rank's share."""
        return self.config.batch_sequences * self.world_size

    def synchronize(self) -> None:
        """Give every rank rank 0's model, optimizer state and step count (after rank 0 restored
        a saved state, say). A collective: every rank calls it."""
        box: list[bytes | None] = [self.state_bytes() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if self.rank != 0:
            state = box[0]
            assert state is not None
            self.restore(state)

    def train(self, slice_id: int, seed: bytes) -> float:
        """Rank 0: start a round on every rank (its slice and seed, then rank 0's parameters, which
        hold the chain's adopted weights) and train it; returns the mean loss over all ranks."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank} follows rank 0's rounds (follow), it starts none")
        dist.broadcast_object_list([(slice_id, seed)], src=0)
        return self._round(slice_id, seed)

    def follow(self) -> int:
        """Ranks other than 0: train every round rank 0 starts, until it releases them; returns
        the rounds trained."""
        if self.rank == 0:
            raise RuntimeError("rank 0 starts the rounds (work), it follows none")
        rounds = 0
        while True:
            box: list[tuple[int, bytes] | None] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return rounds
            slice_id, seed = box[0]
            self._round(slice_id, seed)
            rounds += 1

    def release(self) -> None:
        """Rank 0: end the other ranks' `follow` (after its last round)."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank} cannot release the others; rank 0 does")
        dist.broadcast_object_list([None], src=0)

    def _round(self, slice_id: int, seed: bytes) -> float:
        with torch.no_grad():
            for parameter in self.model.parameters():
                dist.broadcast(parameter.data, src=0)
        mean_loss = torch.tensor([super().train(slice_id, seed)], dtype=torch.float64, device=self.device)
        dist.all_reduce(mean_loss)
        return mean_loss.item() / self.world_size

    def batch(self, seed: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the step's batch (`shard_batch`)."""
        config = self.config
        return shard_batch(self.train_text, seed, config.batch_sequences, self.model.config.context,
                           self.rank, self.world_size)  # fmt: skip

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss through DistributedDataParallel, whose backward averages the gradients across ranks."""
        loss: torch.Tensor = self.parallel(inputs, targets)
        return loss
