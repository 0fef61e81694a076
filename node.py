"""potchain: the command line, and the composition root of the full node."""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chain.blocks import Kind, TrainingBody, ValidationBody
from chain.crypto import PrivateKey, devnet_key
from chain.store import ChainDB, CorruptStore
from consensus.genesis import Genesis, GenesisError
from consensus.proposals import attest, propose_best_training_block, propose_validation_block
from consensus.rules import (
    Chain,
    InvalidBlock,
    apply_block,
    compute_assigned_slice,
    compute_training_seed,
    genesis_block,
    genesis_state,
    is_confirmed,
)
from genesis import DEVNET, chunk_directory, load_genesis
from p2p.full_node import FullNode, mean_loss
from training.data import SPLITS, ChunkError, load_split, sample_batch, seed_from_int
from training.evaluate import BACKENDS, CanonicalEvaluator, default_backend, make_backend
from training.miner import Miner, TrainingConfig
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


def validator_keys(genesis: Genesis) -> list[PrivateKey]:
    """The INSECURE devnet keys of genesis validators (validator-0, validator-1, ...)."""
    stakers = {account.public_key for account in genesis.accounts if account.stake}
    keys = [devnet_key(f"validator-{index}") for index in range(len(stakers))]
    return [key for key in keys if key.public_key in stakers]


def command_localnet(args: argparse.Namespace) -> dict[str, object]:
    """An in-process network: devnet validators and one CPU miner, until N training blocks are final."""
    if args.finalize < 1:
        raise UserError(f"--finalize must be at least 1, got {args.finalize}")
    started = time.perf_counter()
    node = FullNode(args.genesis, args.datadir)
    chain, genesis = node.chain, node.genesis
    train_text = load_split(genesis.dataset, chunk_directory(args.genesis, genesis), "train")
    validators = validator_keys(genesis)
    if not validators:
        raise UserError("genesis has no devnet validator keys; localnet needs them")
    miner_key = devnet_key("miner-0")
    config = TrainingConfig(steps=args.steps, device=args.device)
    miner = Miner(chain.weights(node.finalized()[1]), chain.layout, train_text, config)
    initial = genesis_state(genesis)
    losses = {"validation_loss_genesis": mean_loss(chain, initial, "validation")}
    losses["test_loss_genesis"] = mean_loss(chain, initial, "test")
    try:
        while (node.finalized()[1].finalized_height + 1) // 2 < args.finalize:
            parent, state = node.finalized()
            slice_id = compute_assigned_slice(parent.header, miner_key.public_key, genesis.partition.slices)
            seed = compute_training_seed(parent.hash, miner_key.public_key)
            training = None
            for attempt in range(args.attempts):
                work = miner.work(chain.weights(state), slice_id, seed + attempt.to_bytes(4, "big"))
                timestamp = max(int(time.time()), parent.header.timestamp + 1)
                candidate = propose_best_training_block(
                    chain, parent, state, miner_key, work.values, timestamp, work.steps
                )
                assert isinstance(candidate.body, TrainingBody)
                gain = candidate.body.loss_before - candidate.body.loss_after
                if gain >= state.difficulty:
                    training = candidate
                    break
            if training is None:
                need = state.difficulty
                raise UserError(f"the miner found no update with gain >= {need} in {args.attempts} attempts")
            node.import_block(training.encode())
            for key in validators:
                node.store.on_attestation(attest(chain, key, state, training))
            attestations = list(node.store.attestations.get(training.hash, {}).values())
            proposer = validators[training.header.height % len(validators)]
            timestamp = max(int(time.time()), training.header.timestamp + 1)
            evidence = list(node.store.evidence.values())
            validation = propose_validation_block(chain, training, state, proposer, attestations, evidence, timestamp)
            node.import_block(validation.encode())
            node.store.evidence.clear()
            assert isinstance(validation.body, ValidationBody)
            assert isinstance(training.body, TrainingBody)
            if is_confirmed(validation.body):
                miner.published(training.body.slice_id, np.frombuffer(training.body.weights, dtype="<i2"))
            else:
                test_gain = sum(a.gain for a in validation.body.attestations)
                print(f"[localnet] update rejected out of sample (test gain {test_gain})", file=sys.stderr)
            final_state = node.finalized()[1]
            count = (final_state.finalized_height + 1) // 2
            print(
                f"[localnet] finalized {count}/{args.finalize} height {validation.header.height} "
                f"gain {gain} difficulty {final_state.difficulty} "
                f"val {mean_loss(chain, final_state, 'validation'):.4f} "
                f"({time.perf_counter() - started:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        head_block, head_state = node.finalized()
        losses["validation_loss_head"] = mean_loss(chain, head_state, "validation")
        losses["test_loss_head"] = mean_loss(chain, head_state, "test")
        return {
            "finalized_height": head_state.finalized_height,
            "finalized_training_blocks": (head_state.finalized_height + 1) // 2,
            "head_hash": node.db.head().hex(),
            "head_height": head_block.header.height,
            "state_root": head_state.root.hex(),
            **losses,
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        node.close()


def command_replay(args: argparse.Namespace) -> dict[str, object]:
    """Re-validate the stored canonical chain from genesis into a fresh state."""
    genesis = load_genesis(args.genesis)
    directory = chunk_directory(args.genesis, genesis)
    chain = Chain(
        genesis,
        validation_text=load_split(genesis.dataset, directory, "validation"),
        test_text=load_split(genesis.dataset, directory, "test"),
    )
    state = genesis_state(genesis)
    parent = genesis_block(genesis, state)
    if not (args.datadir / "chain").exists():
        raise UserError(f"{args.datadir}: no chain database here")
    db = ChainDB(args.datadir / "chain", bytes.fromhex(genesis.hash), parent, state)
    try:
        head = db.head()
        stored_root = db.state(head).root
        started = time.perf_counter()
        blocks = 0
        for block in db.canonical_blocks():
            if block.header.kind == Kind.GENESIS:
                if block.hash != parent.hash:
                    raise CorruptStore(f"stored genesis block {block.hash.hex()} is not this genesis's")
                continue
            try:
                state = apply_block(state, parent, block, chain)
            except InvalidBlock as error:
                raise CorruptStore(f"stored block at height {block.header.height} is invalid: {error}") from None
            parent = block
            blocks += 1
        seconds = time.perf_counter() - started
    finally:
        db.close()
    if parent.hash != head:
        raise CorruptStore(f"the canonical chain ends at {parent.hash.hex()}, the head is {head.hex()}")
    if state.root != stored_root:
        raise CorruptStore(f"state_root: replay gives {state.root.hex()}, the store has {stored_root.hex()}")
    return {
        "state_root": state.root.hex(),
        "head_hash": head.hex(),
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "blocks_per_second": round(blocks / seconds, 3) if seconds > 0 else None,
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

    localnet = commands.add_parser("localnet", help="in-process network: devnet validators and a CPU miner")
    localnet.add_argument("--genesis", type=Path, default=DEVNET)
    localnet.add_argument("--datadir", type=Path, required=True, help="node data directory (created if missing)")
    localnet.add_argument("--finalize", type=int, default=10, help="stop once this many training blocks are final")
    localnet.add_argument("--steps", type=int, default=TrainingConfig.steps, help="optimizer steps per mining attempt")
    localnet.add_argument("--attempts", type=int, default=8, help="mining attempts before giving up on a height")
    localnet.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    localnet.set_defaults(handler=command_localnet)

    replay = commands.add_parser("replay", help="re-validate the stored chain from genesis (one JSON line)")
    replay.add_argument("--genesis", type=Path, default=DEVNET)
    replay.add_argument("--datadir", type=Path, required=True)
    replay.set_defaults(handler=command_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_memory_allocator()
    try:
        result = args.handler(args)
    except (UserError, GenesisError, ChunkError, WeightsError, CorruptStore, ValueError) as error:
        print(f"potchain: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
