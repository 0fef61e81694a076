"""potchain: the command line, and the composition root of the full node."""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from consensus.genesis import GenesisError
from genesis import DEVNET, chunk_directory, load_genesis
from training.data import SPLITS, ChunkError, load_split, sample_batch, seed_from_int
from training.evaluate import BACKENDS, CanonicalEvaluator, default_backend, make_backend
from training.weights import WeightsError, load_weights


def tune_memory_allocator() -> None:
    """Keep freed memory in the process instead of returning it to the kernel.

    The evaluator and the miner allocate and free many same-sized tensors of
    several MiB; glibc by default maps each with mmap and unmaps it on free, so
    every allocation pays page faults again (about a third of an evaluation's
    time on the devnet). Raising the mmap and trim thresholds makes the heap
    reuse that memory. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 1 << 30)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def command_eval(args: argparse.Namespace) -> dict[str, object]:
    """Canonical loss of a model on one seeded batch of a split."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    genesis = load_genesis(args.genesis)
    if args.weights is None:
        weights = genesis.initial_weights()
    else:
        weights = load_weights(args.weights, genesis.model, genesis.exponents)
    text = load_split(genesis.dataset, chunk_directory(args.genesis, genesis), args.split)
    sequences = genesis.evaluation.test_sequences if args.split == "test" else genesis.evaluation.validation_sequences
    inputs, targets = sample_batch(text, seed_from_int(args.seed), sequences, genesis.model.context)
    backend = args.backend or default_backend(args.device)
    evaluator = CanonicalEvaluator(weights, genesis.tables(), make_backend(backend, args.device))
    started = time.perf_counter()
    result = evaluator.per_token_losses(inputs, targets)
    return {
        "genesis_hash": genesis.hash,
        "split": args.split,
        "seed": args.seed,
        "backend": backend,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "loss_total": result.loss_total,
        "tokens": result.tokens,
        "per_token_sha256": result.per_token_sha256,
        "loss_per_token": round(result.mean_loss, 6),
        "seconds": round(time.perf_counter() - started, 3),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potchain", description="A proof-of-training blockchain full node.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = commands.add_parser("eval", help="canonical loss of a model on a seeded batch (one JSON line)")
    evaluate.add_argument("--genesis", type=Path, default=DEVNET, help="genesis file (default: the devnet)")
    evaluate.add_argument("--split", choices=SPLITS, default="validation")
    evaluate.add_argument("--seed", type=int, default=0, help="batch seed, a non-negative integer")
    evaluate.add_argument("--weights", type=Path, help="canonical weights (safetensors); default: genesis weights")
    evaluate.add_argument("--backend", choices=BACKENDS, help="default: cpu-fused on the CPU, torch-f64 on CUDA")
    evaluate.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    evaluate.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    evaluate.set_defaults(handler=command_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_memory_allocator()
    try:
        result = args.handler(args)
    except (UserError, GenesisError, ChunkError, WeightsError, ValueError) as error:
        print(f"potchain: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
