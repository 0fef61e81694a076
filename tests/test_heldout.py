"""Held-out shards: Merkle proofs, which sequences a test reveals, shard files, the shipped
genesis commitments (the devnet's INSECURE shards, the testnet's placeholders), and the
`potchain heldout` commands; the numbers docs/node.md states are computed here."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import node
from chain.crypto import devnet_key
from chain.heldout import (
    MAGIC,
    SELECTION_ATTEMPTS_PER_SEQUENCE,
    ZERO_HASH,
    Shard,
    ShardError,
    devnet_shards,
    empty_bitmap,
    is_revealed,
    load_shard,
    merkle_levels,
    merkle_proof,
    proof_length,
    save_shard,
    select_indices,
    sequence_leaf,
    shard_from_text,
    verify_merkle_proof,
    with_revealed,
)
from consensus.genesis import Genesis, parse_genesis
from genesis import DEVNET, TESTNET, chunk_directory, devnet_shard, load_genesis
from genesis.build import (
    PLACEHOLDER_NOTE,
    TESTNET_VALIDATORS,
    genesis_text,
    placeholder_validators,
    shipped_documents,
)
from training.data import load_split


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object] | None, str]:
    """`potchain ARGS` in this process: exit code, the JSON it printed, stderr."""
    capsys.readouterr()
    code = node.main(list(args))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def assert_error(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("potchain: error: ") and message in lines[0], stderr


def numbered_shard(count: int, sequence_bytes: int = 5) -> Shard:
    """A shard of `count` distinct sequences (byte i repeated)."""
    return Shard(sequence_bytes, tuple(bytes([index % 256]) * sequence_bytes for index in range(count)))


@pytest.fixture(scope="module")
def test_texts() -> dict[str, tuple[Genesis, bytes]]:
    """Each shipped genesis and its test split's text."""
    loaded = {}
    for name, path in (("devnet", DEVNET), ("testnet", TESTNET)):
        genesis = load_genesis(path)
        loaded[name] = (genesis, load_split(genesis.dataset, chunk_directory(path, genesis), "test"))
    return loaded


# --- Merkle proofs --------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_every_index_proves_and_every_wrong_part_is_refused(count: int) -> None:
    shard = numbered_shard(count)
    root = shard.root
    assert proof_length(count) == (count - 1).bit_length()
    for index, sequence in enumerate(shard.sequences):
        leaf, proof = sequence_leaf(sequence), shard.proof(index)
        assert len(proof) == proof_length(count)
        assert verify_merkle_proof(root, count, index, leaf, proof)
        assert not verify_merkle_proof(root, count, count, leaf, proof)  # past the end
        assert not verify_merkle_proof(root, count, -1, leaf, proof)
        assert not verify_merkle_proof(root, count, index, sequence_leaf(sequence + b"x"), proof)
        assert not verify_merkle_proof(bytes(32), count, index, leaf, proof)
        assert not verify_merkle_proof(root, count, index, leaf, (*proof, ZERO_HASH))  # one too many
        if count > 1:
            assert not verify_merkle_proof(root, count, (index + 1) % count, leaf, proof)  # another index
            assert not verify_merkle_proof(root, count, index, leaf, proof[:-1])  # one too few
    if count > 1:
        # The leaf hash is domain-separated from inner nodes: an inner node is no leaf.
        levels = merkle_levels([sequence_leaf(s) for s in shard.sequences])
        assert not verify_merkle_proof(root, count, 0, levels[1][0], merkle_proof(levels, 0))


def parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def test_the_tree_pads_odd_levels_with_the_zero_hash() -> None:
    a, b, c = (sequence_leaf(bytes([n])) for n in range(3))
    assert merkle_levels([a, b, c])[-1] == [parent(parent(a, b), parent(c, ZERO_HASH))]
    assert sequence_leaf(b"ab") == hashlib.sha256(b"\x00ab").digest()
    assert numbered_shard(1).root == sequence_leaf(numbered_shard(1).sequences[0]) and numbered_shard(1).proof(0) == ()


# --- Which sequences a test reveals -------------------------------------------------


def test_selection_is_distinct_unrevealed_deterministic_and_follows_the_formula() -> None:
    count, seed = 100, bytes(range(32))
    revealed = with_revealed(empty_bitmap(count), range(0, count, 3))
    chosen = select_indices(seed, revealed, count, 20)
    assert chosen is not None and len(chosen) == len(set(chosen)) == 20
    assert not any(is_revealed(revealed, index) for index in chosen) and all(0 <= i < count for i in chosen)
    assert select_indices(seed, revealed, count, 20) == chosen
    assert select_indices(bytes(32), revealed, count, 20) != chosen
    assert select_indices(seed, empty_bitmap(count), count, 3) == tuple(draw(seed, n, count) for n in range(3))


def test_selection_is_none_when_fewer_are_left_than_wanted() -> None:
    count = 40
    revealed = with_revealed(empty_bitmap(count), range(count - 5))
    assert select_indices(b"s" * 32, revealed, count, 6) is None
    assert set(select_indices(b"s" * 32, revealed, count, 5) or ()) == set(range(count - 5, count))
    assert select_indices(b"s" * 32, with_revealed(revealed, range(count)), count, 1) is None


def draw(seed: bytes, number: int, count: int) -> int:
    """Draw `number` of select_indices: the documented formula."""
    digest = hashlib.sha256(b"potchain/heldout-index" + seed + number.to_bytes(4, "big")).digest()
    return int.from_bytes(digest[:8], "big") % count


def test_a_nearly_spent_shard_falls_back_to_scanning_upward() -> None:
    count, seed = 64, bytes(32)
    draws = [draw(seed, number, count) for number in range(2 * SELECTION_ATTEMPTS_PER_SEQUENCE)]
    assert {3, 20, 57}.isdisjoint(draws) and draws[-1] == 5  # none of the draws ever picks 3, 20 or 57
    only_20 = with_revealed(empty_bitmap(count), (index for index in range(count) if index != 20))
    assert select_indices(seed, only_20, count, 1) == (20,)
    # Two left: after 128 fruitless draws the scan goes upward from the last (5), wrapping around.
    only_3_and_57 = with_revealed(empty_bitmap(count), (index for index in range(count) if index not in (3, 57)))
    assert select_indices(seed, only_3_and_57, count, 2) == (57, 3)


# --- Shards and shard files -----------------------------------------------------------


def test_text_is_cut_into_disjoint_sequences_and_dealt_in_turn() -> None:
    shard = shard_from_text(bytes(range(23)), 5)
    assert shard.count == 4 and shard.sequences[1] == bytes(range(5, 10))  # the 3-byte tail is dropped
    with pytest.raises(ShardError, match="text: 4 bytes, too short for one sequence of 5"):
        shard_from_text(bytes(4), 5)
    dealt = devnet_shards(bytes(range(50)), 5, 3)
    assert [s.count for s in dealt] == [4, 3, 3] and dealt[1].sequences == (
        bytes(range(5, 10)),
        bytes(range(20, 25)),
        bytes(range(35, 40)),
    )
    with pytest.raises(ShardError, match="test text: 2 sequences for 3 validators"):
        devnet_shards(bytes(10), 5, 3)
    with pytest.raises(ShardError, match="sequence 1 has 4 bytes, want 5"):
        Shard(5, (bytes(5), bytes(4)))
    with pytest.raises(ShardError, match="0 sequences, want 1 to"):
        Shard(5, ())


def test_a_shard_file_round_trips_privately(tmp_path: Path) -> None:
    shard = numbered_shard(11, 7)
    path = tmp_path / "shard"
    save_shard(shard, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes()[: len(MAGIC)] == MAGIC
    loaded = load_shard(path)
    assert loaded == shard and loaded.root == shard.root


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"potchain-heldout-9\n" + data[len(MAGIC) :], "not a held-out shard file"),
        (lambda data: data[: len(MAGIC) + 5], "not a held-out shard file"),
        (lambda data: data[:-1], "76 bytes of sequences, want 11 of 7"),
        (lambda data: data + b"x", "78 bytes of sequences, want 11 of 7"),
        (lambda data: MAGIC + bytes(4) + data[len(MAGIC) + 4 :], "bytes of sequences, want 11 of 0"),
        (lambda data: MAGIC + (7).to_bytes(4, "big") + bytes(4), "0 sequences, want 1 to"),
    ],
)
def test_a_damaged_shard_file_is_refused_naming_it(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    path = tmp_path / "shard"
    save_shard(numbered_shard(11, 7), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ShardError, match=message) as raised:
        load_shard(path)
    assert str(raised.value).startswith(f"{path}: ")
    with pytest.raises(ShardError, match="cannot read the held-out shard"):
        load_shard(tmp_path / "absent")


# --- The shipped genesis commitments ----------------------------------------------------


def test_devnet_shards_are_the_shipped_commitments(test_texts: dict[str, tuple[Genesis, bytes]]) -> None:
    genesis, text = test_texts["devnet"]
    validators = [account for account in genesis.accounts if account.stake > 0]
    assert [account.public_key for account in validators] == [devnet_key(f"validator-{i}").public_key for i in range(4)]
    expected = devnet_shards(text, genesis.model.context + 1, 4)
    for index, account in enumerate(validators):
        shard = devnet_shard(genesis, DEVNET, account.public_key)
        assert shard is not None and shard == expected[index]
        assert account.heldout is not None and (shard.root, shard.count) == (account.heldout.root,
                                                                              account.heldout.sequences)  # fmt: skip
    assert devnet_shard(genesis, DEVNET, bytes(32)) is None  # not a validator
    # Dealt in turn: sequence i of the test text to validator i mod 4.
    assert expected[1].sequences[:2] == (text[129:258], text[5 * 129 : 6 * 129])


def edited_devnet(change: Callable[[dict[str, Any]], object]) -> Genesis:
    """The devnet genesis with its document changed by `change`."""
    document = json.loads(DEVNET.read_text())
    change(document)
    return parse_genesis(json.dumps(document).encode())


def test_devnet_shard_is_only_for_development_chains_and_matching_commitments() -> None:
    address = devnet_key("validator-1").public_key
    renamed = edited_devnet(lambda d: d.update(chain_id="acme-net-1"))
    assert devnet_shard(renamed, DEVNET, address) is None  # a chain of operators: its validators' own shards
    still_devnet = edited_devnet(lambda d: d.update(chain_id="potchain-devnet-7"))
    assert devnet_shard(still_devnet, DEVNET, address) is not None
    other_root = edited_devnet(lambda d: d["accounts"][1]["heldout"].update(root="ab" * 32))
    assert devnet_shard(other_root, DEVNET, address) is None
    assert devnet_shard(other_root, DEVNET, devnet_key("validator-2").public_key) is not None
    other_count = edited_devnet(lambda d: d["accounts"][1]["heldout"].update(sequences=681))
    assert devnet_shard(other_count, DEVNET, address) is None
    uncommitted = edited_devnet(lambda d: d["accounts"][1].pop("heldout"))
    assert devnet_shard(uncommitted, DEVNET, address) is None


def test_the_testnet_commitments_are_public_placeholders(test_texts: dict[str, tuple[Genesis, bytes]]) -> None:
    """genesis/testnet-validators.json's commitments are devnet-style shards of the public test
    text at the testnet's context + 1, and its note says so."""
    genesis, text = test_texts["testnet"]
    placeholders = devnet_shards(text, genesis.model.context + 1, 4)
    validators = [account for account in genesis.accounts if account.stake > 0]
    assert [(a.heldout.root, a.heldout.sequences) for a in validators if a.heldout is not None] == [
        (shard.root, shard.count) for shard in placeholders
    ]
    assert genesis_text(placeholder_validators(shipped_documents())) == TESTNET_VALIDATORS.read_text()
    note = json.loads(TESTNET_VALIDATORS.read_text())["note"]
    assert note == PLACEHOLDER_NOTE and "PLACEHOLDERS" in note and "INSECURE" in note
    assert devnet_shard(genesis, TESTNET, validators[0].public_key) is None  # not a development chain


def test_the_numbers_node_md_states(test_texts: dict[str, tuple[Genesis, bytes]]) -> None:
    """docs/node.md, Held-out data for validators: bytes a judged height reveals, and how long a devnet shard lasts."""
    devnet, testnet = test_texts["devnet"][0], test_texts["testnet"][0]
    assert (devnet.evaluation.test_sequences, devnet.model.context + 1) == (32, 129)
    assert devnet.evaluation.test_sequences * (devnet.model.context + 1) == 4_128
    assert (testnet.evaluation.test_sequences, testnet.model.context + 1) == (64, 513)
    assert testnet.evaluation.test_sequences * (testnet.model.context + 1) == 32_832
    assert 1_000 * testnet.evaluation.test_sequences * (testnet.model.context + 1) == 32_832_000  # 32.8 MB
    counts = [account.heldout.sequences for account in devnet.accounts if account.heldout is not None]
    assert counts == [682, 682, 681, 681]
    assert [count // devnet.evaluation.test_sequences for count in counts] == [21] * 4
    testnet_counts = [account.heldout.sequences for account in testnet.accounts if account.heldout is not None]
    assert [count // testnet.evaluation.test_sequences for count in testnet_counts] == [2] * 4


# --- potchain heldout ----------------------------------------------------------------


def test_heldout_new_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(bytes(range(256)) * 20)  # 5,120 bytes
    second.write_bytes(b"private text " * 300)  # 3,900 bytes
    out = tmp_path / "shard"
    code, made, stderr = run_main(capsys, "heldout", "new", "--genesis", str(DEVNET), "--text", str(first),
                                  "--text", str(second), "--out", str(out))  # fmt: skip
    assert code == 0 and made is not None, stderr
    expected = shard_from_text(first.read_bytes() + second.read_bytes(), 129)  # 9,020 bytes: 69 sequences
    assert made == {"root": expected.root.hex(), "sequences": 69, "bytes_per_test": 32 * 129, "tests": 2}
    assert load_shard(out) == expected and stat.S_IMODE(out.stat().st_mode) == 0o600
    code, shown, stderr = run_main(capsys, "heldout", "show", str(out), "--genesis", str(DEVNET))
    assert code == 0 and shown == made, stderr
    # The testnet cuts 513-byte sequences: 17 of them, less than one test of 64.
    code, _, stderr = run_main(capsys, "heldout", "show", str(out), "--genesis", str(TESTNET))
    assert_error(code, stderr, f"{out}: sequences of 129 bytes, want 513 (the context + 1 of {TESTNET})")
    # An existing shard is replaced only with --force.
    code, _, stderr = run_main(capsys, "heldout", "new", "--genesis", str(DEVNET), "--text", str(first),
                               "--out", str(out))  # fmt: skip
    assert_error(code, stderr, f"{out}: the file exists; not overwriting a held-out shard (--force replaces it)")
    assert load_shard(out) == expected
    code, made, stderr = run_main(capsys, "heldout", "new", "--genesis", str(DEVNET), "--text", str(first),
                                  "--out", str(out), "--force")  # fmt: skip
    assert code == 0 and made is not None and made["sequences"] == 39 and made["tests"] == 1, stderr
    assert load_shard(out) == shard_from_text(first.read_bytes(), 129)


def test_heldout_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * (32 * 129 - 1))
    out = tmp_path / "shard"
    code, _, stderr = run_main(capsys, "heldout", "new", "--genesis", str(DEVNET), "--text", str(short),
                               "--out", str(out))  # fmt: skip
    assert_error(code, stderr, "--text: got 4,127 bytes, want at least 4,128: a test reveals 32 sequences of 129")
    code, _, stderr = run_main(capsys, "heldout", "new", "--genesis", str(DEVNET), "--text", str(tmp_path / "none"),
                               "--out", str(out))  # fmt: skip
    assert_error(code, stderr, f"{tmp_path / 'none'}: cannot read the text (No such file or directory)")
    code, _, stderr = run_main(capsys, "heldout", "new", "--genesis", str(DEVNET), "--text", str(short),
                               "--out", str(tmp_path / "missing" / "shard"))  # fmt: skip
    assert_error(code, stderr, "no such directory")
    assert not out.exists()
    not_a_shard = tmp_path / "notes.txt"
    not_a_shard.write_text("hello")
    code, _, stderr = run_main(capsys, "heldout", "show", str(not_a_shard), "--genesis", str(DEVNET))
    assert_error(code, stderr, f"{not_a_shard}: not a held-out shard file")
    code, _, stderr = run_main(capsys, "heldout", "show", str(out), "--genesis", str(DEVNET))
    assert_error(code, stderr, f"{out}: cannot read the held-out shard")
