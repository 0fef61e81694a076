"""Genesis files and the shipped corpus; `load_genesis` reads one from disk, `devnet_shard`
rebuilds a devnet validator's INSECURE held-out shard from it."""

from __future__ import annotations

from pathlib import Path

from chain.heldout import Shard, ShardError, devnet_shards
from chain.keystore import is_devnet_chain_id
from consensus.genesis import Genesis, GenesisError, parse_genesis
from training.data import load_split

GENESIS_DIR = Path(__file__).resolve().parent
DEVNET = GENESIS_DIR / "devnet.json"
TESTNET = GENESIS_DIR / "testnet.json"


def load_genesis(path: Path) -> Genesis:
    """Read and validate a genesis file; errors name the file and the field."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise GenesisError(f"{path}: cannot read genesis ({error.strerror})") from None
    try:
        return parse_genesis(raw)
    except GenesisError as error:
        raise GenesisError(f"{path}: {error}") from None


def chunk_directory(path: Path, genesis: Genesis) -> Path:
    """Where the genesis at `path` keeps its corpus chunks."""
    return path.resolve().parent / genesis.chunk_directory


def devnet_shard(genesis: Genesis, genesis_path: Path, address: bytes) -> Shard | None:
    """The INSECURE held-out shard of the devnet validator `address`, rebuilt from the public
    test documents of the genesis at `genesis_path`: `chain.heldout.devnet_shards` of the test
    split at the model's context + 1, dealt to the accounts with stake in genesis order, the
    one at `address`'s position. None unless the chain id marks a development network (it
    begins with "potchain-devnet", like the name keys it goes with) and the shard's root and
    count are the account's commitment in genesis (a validator of another genesis holds its
    own private shard)."""
    if not is_devnet_chain_id(genesis.chain_id):
        return None
    validators = [account for account in genesis.accounts if account.stake > 0]
    position = next((index for index, account in enumerate(validators) if account.public_key == address), None)
    if position is None:
        return None
    commitment = validators[position].heldout
    if commitment is None:
        return None
    text = load_split(genesis.dataset, chunk_directory(genesis_path, genesis), "test")
    try:
        shard = devnet_shards(text, genesis.model.context + 1, len(validators))[position]
    except ShardError:  # fewer test sequences than validators: no devnet shards
        return None
    if (shard.root, shard.count) != (commitment.root, commitment.sequences):
        return None
    return shard
