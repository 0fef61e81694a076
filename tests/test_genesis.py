"""Genesis parsing: every field checked, clear errors, a stable hash."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consensus.genesis import GenesisError, parse_genesis
from genesis import DEVNET, TESTNET, load_genesis


def document() -> dict[str, Any]:
    value = json.loads(DEVNET.read_bytes())
    assert isinstance(value, dict)
    return value


def test_shipped_genesis_files_parse() -> None:
    devnet, testnet = load_genesis(DEVNET), load_genesis(TESTNET)
    assert devnet.model.parameter_count() == 221_760
    assert 20_000_000 < testnet.model.parameter_count() < 60_000_000
    assert devnet.hash != testnet.hash


def test_hash_ignores_formatting_but_not_content() -> None:
    original = parse_genesis(DEVNET.read_bytes())
    reformatted = parse_genesis(json.dumps(document(), indent=4, sort_keys=True).encode())
    assert reformatted.hash == original.hash
    changed = document()
    changed["timestamp"] += 1
    assert parse_genesis(json.dumps(changed).encode()).hash != original.hash


def edit(path: str, value: Any) -> bytes:
    """The devnet document with the field at a dotted path set (or deleted, for ...)."""
    root = document()
    keys = path.split(".")
    target = root
    for key in keys[:-1]:
        target = target[key]
    if value is ...:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return json.dumps(root).encode()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("chain_id", ..., "chain_id: missing"),
        ("model.heads", ..., "model.heads: missing"),
        ("model.heads", "4", 'model.heads: expected an integer, got "4"'),
        ("model.width", 0, r"model.width: 0 outside \[1, 16384\]"),
        ("model.heads", 2, "head size 32 is not a power of 4"),
        ("model.tensors", {}, r"model.tensors.wte.weight: missing"),
        ("partition.scheme", "layers", "partition.scheme: 'layers', want one of random-mask"),
        ("evaluation.tables_sha256", "00", "evaluation.tables_sha256: '00' does not match"),
        ("evaluation.program", "float", "evaluation.program: 'float'"),
        ("timestamp", 1.5, "timestamp: 1.5 is a float"),
        ("extra", 1, "genesis: unknown field 'extra'"),
        ("dataset.chunk_directory", "../elsewhere", "must be a relative path"),
    ],
)
def test_bad_fields_are_named(path: str, value: Any, message: str) -> None:
    with pytest.raises(GenesisError, match=message):
        parse_genesis(edit(path, value))


def test_wrong_exponent_and_chunk_count_are_named() -> None:
    root = document()
    root["model"]["tensors"]["h.1.mlp.c_proj.weight"]["exponent"] = 3
    with pytest.raises(GenesisError, match=r"h.1.mlp.c_proj.weight: exponent 3 outside \[5, 15\]"):
        parse_genesis(json.dumps(root).encode())
    root = document()
    root["dataset"]["documents"][0]["chunks"].pop()
    with pytest.raises(GenesisError, match=r"dataset.documents\[0\].chunks: \d+ chunks, size \d+ needs \d+"):
        parse_genesis(json.dumps(root).encode())


def test_not_json_is_rejected() -> None:
    with pytest.raises(GenesisError, match="not valid JSON"):
        parse_genesis(b"{")
    with pytest.raises(GenesisError, match="expected an object"):
        parse_genesis(b"[]")
