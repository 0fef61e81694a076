"""Canonical losses are identical on every backend, thread count and SIMD level;
float32 losses are not (which shows the comparison can see a difference)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from tests.conftest import ROOT, run_potchain

CONFIGURATIONS = [
    ("cpu-fused", 1, None),
    ("cpu-fused", 2, None),
    ("cpu-fused", 2, "default"),
    ("torch-f64", 1, None),
    ("torch-f64", 2, None),
    ("torch-f64", 2, "default"),
    ("torch-f64", 1, "avx2"),
    ("torch-f64", 2, "avx2"),
    ("torch-int64", 1, "default"),
    ("torch-int64", 2, None),
]

FLOAT32_LOSSES = """
import hashlib, json, sys, torch
import torch.nn.functional as F
from genesis import DEVNET, chunk_directory, load_genesis
from training.data import load_split, sample_batch, seed_from_int
torch.set_num_threads(int(sys.argv[1]))
genesis = load_genesis(DEVNET)
text = load_split(genesis.dataset, chunk_directory(DEVNET, genesis), "validation")
inputs, targets = sample_batch(text, seed_from_int(7), genesis.evaluation.validation_sequences, genesis.model.context)
model = genesis.initial_weights().to_model().eval()
with torch.no_grad():
    logits = model(inputs)
    losses = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), reduction="none")
print(json.dumps({"sha256": hashlib.sha256(losses.numpy().tobytes()).hexdigest()}))
"""


def test_canonical_losses_match_across_backends_threads_and_simd_levels() -> None:
    results = []
    for backend, threads, capability in CONFIGURATIONS:
        env = {"ATEN_CPU_CAPABILITY": capability} if capability else {}
        completed = run_potchain(
            "eval", "--genesis", "genesis/devnet.json", "--split", "validation", "--seed", "7",
            "--backend", backend, "--threads", str(threads), env=env,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        results.append(completed.json())
    first = results[0]
    assert isinstance(first["loss_total"], int) and first["tokens"] == 32 * 128
    for result in results[1:]:
        assert (result["loss_total"], result["per_token_sha256"]) == (first["loss_total"], first["per_token_sha256"])


def test_float32_losses_differ_across_simd_levels() -> None:
    hashes = set()
    for capability in ("default", "avx2"):
        for threads in (1, 2):
            env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
            process = subprocess.run(
                [sys.executable, "-c", FLOAT32_LOSSES, str(threads)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
            hashes.add(json.loads(process.stdout)["sha256"])
    assert len(hashes) > 1, "float32 gave identical bits everywhere; the canonical check would prove nothing"
    assert hashlib.sha256(b"").hexdigest() not in hashes


BENCH_TRAINING = """
import hashlib, json, os, sys
sys.path.insert(0, "bench")
from convergence import prepare
from genesis import DEVNET
from training.baseline import train_centralized
from training.miner import TrainingConfig
chain, train_text, _ = prepare(DEVNET, threads=1)
digests = []
def digest(weights):
    content = b"".join(weights.tensors[name].tobytes() for name in sorted(weights.tensors))
    digests.append(hashlib.sha256(content).hexdigest())
    return 0.0
train_centralized(chain.genesis.initial_weights(), train_text, 40, TrainingConfig(), 40, digest)
print(json.dumps({"sha256": digests[-1], "mkl_cbwr": os.environ.get("MKL_CBWR")}))
"""


def test_bench_float_training_repeats_bit_for_bit() -> None:
    """The benches' float training, prepared at one thread (bench/convergence.py `prepare`),
    gives the same weights on every run (docs/benchmarks.md reads losses to the third decimal)."""
    results = []
    for _ in range(2):
        env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
        process = subprocess.run(
            [sys.executable, "-c", BENCH_TRAINING],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        results.append(json.loads(process.stdout))
    assert results[0]["mkl_cbwr"] == "AUTO,STRICT"
    assert len({result["sha256"] for result in results}) == 1, results
