"""Genesis files and the shipped corpus; `load_genesis` reads one from disk."""

from __future__ import annotations

from pathlib import Path

from consensus.genesis import Genesis, GenesisError, parse_genesis

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
