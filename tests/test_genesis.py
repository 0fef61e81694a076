"""Genesis parsing: every field checked, clear errors, a stable hash."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from consensus.genesis import TIMEOUT_MS_MAX, GenesisError, compute_timeouts, parse_genesis
from consensus.voting import Step, TimeoutParameters
from genesis import DEVNET, TESTNET, load_genesis
from genesis.build import NETWORK_MS, NETWORKS, network_timeouts, transfer_ms


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
        ("consensus.round_timeout_seconds", 60, "consensus: unknown field 'round_timeout_seconds'"),
        ("consensus.timeout_propose_ms", ..., "consensus.timeout_propose_ms: missing"),
        ("consensus.timeout_prevote_ms", ..., "consensus.timeout_prevote_ms: missing"),
        ("consensus.timeout_precommit_ms", ..., "consensus.timeout_precommit_ms: missing"),
        ("consensus.timeout_increment_ms", ..., "consensus.timeout_increment_ms: missing"),
        ("consensus.timeout_propose_ms", 1500.0, "consensus.timeout_propose_ms: 1500.0 is a float"),
        ("consensus.timeout_increment_ms", 0.5, "consensus.timeout_increment_ms: 0.5 is a float"),
        ("consensus.timeout_prevote_ms", "1000", 'consensus.timeout_prevote_ms: expected an integer, got "1000"'),
        ("consensus.timeout_precommit_ms", True, "consensus.timeout_precommit_ms: expected an integer, got true"),
        ("consensus.timeout_propose_ms", 0, r"consensus.timeout_propose_ms: 0 outside \[1, 3600000\]"),
        ("consensus.timeout_prevote_ms", -5, r"consensus.timeout_prevote_ms: -5 outside \[1, 3600000\]"),
        ("consensus.timeout_precommit_ms", 3_600_001, r"consensus.timeout_precommit_ms: 3600001 outside"),
        ("consensus.timeout_increment_ms", 0, r"consensus.timeout_increment_ms: 0 outside \[1, 3600000\]"),
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


def test_timeouts_convert_to_the_voting_parameters() -> None:
    root = document()
    root["consensus"].update(
        timeout_propose_ms=3000, timeout_prevote_ms=1000, timeout_precommit_ms=1200, timeout_increment_ms=500
    )
    timeouts = parse_genesis(json.dumps(root).encode()).consensus.timeouts
    assert timeouts == TimeoutParameters(propose_ms=3000, prevote_ms=1000, precommit_ms=1200, increment_ms=500)
    assert timeouts.duration_ms(Step.PROPOSE, 0) == 3000
    assert timeouts.duration_ms(Step.PREVOTE, 2) == 2000
    assert timeouts.duration_ms(Step.PRECOMMIT, 1) == 1700
    for value in (1, TIMEOUT_MS_MAX):  # the bounds themselves are allowed
        root["consensus"]["timeout_increment_ms"] = value
        assert parse_genesis(json.dumps(root).encode()).consensus.timeouts.increment_ms == value


def test_compute_timeouts_is_the_documented_formula() -> None:
    # evaluation 100 ms, network 1 s, transfer 111 ms: a check is 111 + 4 * 100 = 511 ms, a build 400 ms.
    assert compute_timeouts(100, 1000, 111) == {
        "timeout_propose_ms": 2 * 1000 + 2 * (400 + 511),
        "timeout_prevote_ms": 1100,
        "timeout_precommit_ms": 1100,
        "timeout_increment_ms": 1000 + 511,
    }
    # Every timeout grows with the evaluation cost; all are integers.
    low, high = compute_timeouts(1000, 1000, 0), compute_timeouts(2000, 1000, 0)
    assert all(isinstance(value, int) and high[name] > value for name, value in low.items())
    with pytest.raises(ValueError):
        compute_timeouts(0, 1000, 0)


@pytest.mark.parametrize("name", ["devnet", "testnet"])
def test_shipped_timeouts_derive_from_the_recorded_evaluation_cost(name: str) -> None:
    """The shipped genesis holds exactly compute_timeouts(the cost genesis/build.py records)."""
    network = NETWORKS[name]
    genesis = load_genesis({"devnet": DEVNET, "testnet": TESTNET}[name])
    assert genesis.chain_id == network.chain_id and genesis.model == network.config
    assert genesis.partition.slices == network.slices
    expected = compute_timeouts(network.evaluation_ms, NETWORK_MS, transfer_ms(network.config, network.slices))
    assert expected == network_timeouts(network)
    consensus = genesis.consensus
    assert {field: getattr(consensus, field) for field in expected} == expected
    # Round 0 leaves room for the proposer's build and a validator's check, twice over.
    assert consensus.timeout_propose_ms >= 2 * 8 * network.evaluation_ms


def test_transfer_time_counts_the_largest_slice() -> None:
    devnet, testnet = NETWORKS["devnet"], NETWORKS["testnet"]
    # 2 bytes a weight at 1 MB/s; the largest slice is at least the mean one.
    assert transfer_ms(devnet.config, devnet.slices) >= 2 * devnet.config.parameter_count() // devnet.slices // 1000
    assert transfer_ms(testnet.config, testnet.slices) == 6392


def test_shipped_validators_carry_heldout_commitments() -> None:
    for path in (DEVNET, TESTNET):
        genesis = load_genesis(path)
        validators = [account for account in genesis.accounts if account.stake > 0]
        assert len(validators) == 4
        assert all(account.heldout is not None and account.heldout.sequences > 0 for account in validators)
        roots = {account.heldout.root for account in validators if account.heldout is not None}
        assert len(roots) == 4, path  # every validator its own shard


def with_account(change: Callable[[list[dict[str, Any]]], None]) -> bytes:
    """The devnet document with its accounts changed in place by `change`."""
    root = document()
    change(root["accounts"])
    return json.dumps(root).encode()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda accounts: accounts.append(
                {"public_key": "ab" * 32, "balance": 5, "stake": 0, "heldout": {"root": "cd" * 32, "sequences": 9}}
            ),
            r"accounts\[4\].heldout: only a validator \(stake > 0\) holds a held-out shard",
        ),
        (lambda accounts: accounts[1]["heldout"].update(root="AB" * 32), r"accounts\[1\].heldout.root: 'ABAB"),
        (lambda accounts: accounts[1]["heldout"].update(root="ab" * 31), r"accounts\[1\].heldout.root: 'abab"),
        (lambda accounts: accounts[2]["heldout"].update(sequences=0), r"accounts\[2\].heldout.sequences: 0 outside"),
        (
            lambda accounts: accounts[2]["heldout"].update(sequences=2**20 + 1),
            r"accounts\[2\].heldout.sequences: 1048577 outside \[1, 1048576\]",
        ),
        (lambda accounts: accounts[0]["heldout"].update(salt=1), r"accounts\[0\].heldout: unknown field 'salt'"),
        (lambda accounts: accounts[0]["heldout"].pop("root"), r"accounts\[0\].heldout.root: missing"),
        (lambda accounts: accounts[3].update(heldout=[1]), r"accounts\[3\].heldout: expected an object"),
    ],
)
def test_bad_heldout_commitments_are_named(change: Callable[[list[dict[str, Any]]], None], message: str) -> None:
    with pytest.raises(GenesisError, match=message):
        parse_genesis(with_account(change))


def test_heldout_is_optional_and_part_of_the_hash() -> None:
    original = parse_genesis(DEVNET.read_bytes())
    without = parse_genesis(with_account(lambda accounts: accounts[0].pop("heldout")))
    assert without.accounts[0].heldout is None and without.hash != original.hash
    assert without.accounts[1:] == original.accounts[1:]
