"""Operators' keys: encrypted keystores, the `potchain keys` and `potchain genesis new` commands,
the refusal of devnet name keys outside development networks, and the shipped testnet's keys."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import node
from chain.crypto import PrivateKey, devnet_key
from chain.keystore import (
    DEFAULT_SCRYPT,
    Keystore,
    KeystoreError,
    ScryptParameters,
    is_devnet_chain_id,
    read_key_file,
    write_keystore,
)
from consensus.genesis import HeldOutCommitment, parse_genesis
from genesis import DEVNET, GENESIS_DIR, TESTNET, chunk_directory, load_genesis
from genesis.build import (
    NETWORKS,
    TESTNET_VALIDATORS,
    ValidatorsError,
    genesis_document,
    genesis_text,
    read_validators_file,
    refuse_name_keys,
    shipped_accounts,
    shipped_documents,
)
from tests.conftest import ROOT, Completed
from training.data import load_split

FAST = ScryptParameters(n=1 << 10, r=8, p=1)
"""Cheap KDF parameters for tests of the file format (the CLI always writes DEFAULT_SCRYPT)."""
SEED = bytes(range(32))
TESTNET_CHAIN = load_genesis(TESTNET).chain_id
DEVNET_CHAIN = load_genesis(DEVNET).chain_id


def devnet_commitment(index: int) -> str:
    """The root the devnet's account `index` commits to (an INSECURE shard of public text)."""
    heldout = load_genesis(DEVNET).accounts[index].heldout
    assert heldout is not None
    return heldout.root.hex()


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object] | None, str]:
    """`potchain ARGS` in this process, with no terminal: exit code, the JSON it printed, stderr."""
    capsys.readouterr()
    code = node.main(list(args))
    captured = capsys.readouterr()
    printed = json.loads(captured.out) if code == 0 else None
    return code, printed, captured.err


def run_process(*args: str) -> Completed:
    """`potchain ARGS` as its own process, stdin not a terminal."""
    process = subprocess.run([sys.executable, "-c", "import sys, node; sys.exit(node.main())", *args], cwd=ROOT,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)  # fmt: skip
    return Completed(process.returncode, process.stdout, process.stderr)


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process commands read no passphrase from a terminal."""
    monkeypatch.setattr(sys, "stdin", io.StringIO())


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text("correct horse battery staple\n")
    return path


def assert_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert stderr.startswith("potchain: error: ") and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


# --- the keystore file --------------------------------------------------------------------


def test_a_keystore_round_trips_and_is_written_private_and_atomically(tmp_path: Path) -> None:
    path = tmp_path / "validator.json"
    written = write_keystore(path, SEED, "secret", FAST)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validator.json"]  # no temporary file left
    document = json.loads(path.read_text())
    assert document["public_key"] == PrivateKey(SEED).public_key.hex() == written.public_key.hex()
    assert SEED.hex() not in path.read_text()
    assert {k: v for k, v in document["kdf"].items() if k != "salt"} == {"name": "scrypt", "n": 1024, "r": 8, "p": 1}
    assert document["cipher"]["name"] == "aes-256-gcm"
    found = read_key_file(path)
    assert isinstance(found, Keystore) and found.public_key == PrivateKey(SEED).public_key
    assert found.unlock("secret").public_key == PrivateKey(SEED).public_key
    with pytest.raises(KeystoreError, match=f"{path}: wrong passphrase"):
        found.unlock("Secret")
    # A second keystore of the same seed uses a fresh salt and nonce.
    other = write_keystore(tmp_path / "again.json", SEED, "secret", FAST)
    assert (other.salt, other.nonce) != (written.salt, written.nonce)
    with pytest.raises(KeystoreError, match="the file exists; not overwriting"):
        write_keystore(path, bytes(32), "secret", FAST)
    assert json.loads(path.read_text()) == document
    with pytest.raises(KeystoreError, match="the passphrase is empty"):
        write_keystore(tmp_path / "empty.json", SEED, "", FAST)
    with pytest.raises(KeystoreError, match=f"{tmp_path / 'absent'}/key.json: no such directory"):
        write_keystore(tmp_path / "absent" / "key.json", SEED, "secret", FAST)


def test_the_default_kdf_is_memory_hard() -> None:
    assert (DEFAULT_SCRYPT.n, DEFAULT_SCRYPT.r, DEFAULT_SCRYPT.p, DEFAULT_SCRYPT.memory_bytes) == (
        1 << 17,
        8,
        1,
        128 << 20,
    )
    assert DEFAULT_SCRYPT.problem() is None


def tampered(path: Path, change: str) -> Path:
    document = json.loads(path.read_text())
    if change == "ciphertext":
        data = bytearray.fromhex(document["cipher"]["ciphertext"])
        data[5] ^= 1
        document["cipher"]["ciphertext"] = data.hex()
    elif change == "nonce":
        document["cipher"]["nonce"] = "00" * 12
    elif change == "salt":
        document["kdf"]["salt"] = "11" * 32
    elif change == "kdf":
        document["kdf"]["n"] = 2048
    elif change == "public_key":
        document["public_key"] = devnet_key("mallory").public_key.hex()
    target = path.with_name(f"{change}.json")
    target.write_text(json.dumps(document))
    return target


@pytest.mark.parametrize("change", ["ciphertext", "nonce", "salt", "kdf", "public_key"])
def test_a_tampered_keystore_fails_authentication(tmp_path: Path, change: str) -> None:
    path = tmp_path / "key.json"
    write_keystore(path, SEED, "secret", FAST)
    changed = tampered(path, change)
    found = read_key_file(changed)
    assert isinstance(found, Keystore)
    with pytest.raises(KeystoreError, match=f"{changed}: wrong passphrase, or the keystore was changed"):
        found.unlock("secret")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a keystore: bad JSON"),
        ("[1, 2]", "got a JSON list, want an object"),
        ('{"format": "potchain-keystore", "version": 2}', "version: got 2, want 1"),
        ('{"format": "other", "version": 1}', "format: got \"other\", want 'potchain-keystore'"),
        ("zz" * 32, "this one is not hex"),
        ("ab" * 31, "holds 64 hex characters, got 62"),
    ],
)
def test_a_bad_key_file_is_a_clear_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "key"
    path.write_text(text)
    with pytest.raises(KeystoreError) as raised:
        read_key_file(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value), raised.value


def test_kdf_parameters_past_the_limits_are_refused_before_deriving(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    write_keystore(path, SEED, "secret", FAST)
    document = json.loads(path.read_text())
    cases = [("n", 1 << 24, "want at most 1073741824"), ("n", 1000, "a power of two"), ("r", 0, "kdf.r: got 0"),
             ("p", True, "kdf.p: got true, want an integer")]  # fmt: skip
    for field, value, message in cases:
        changed = json.loads(json.dumps(document))
        changed["kdf"][field] = value
        path.write_text(json.dumps(changed))
        with pytest.raises(KeystoreError, match=message):
            read_key_file(path)


# --- potchain keys ---------------------------------------------------------------------


def test_keys_new_show_and_the_refusals(
    tmp_path: Path, passphrase_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "operator.json"
    code, made, stderr = run_main(capsys, "keys", "new", "--out", str(out), "--passphrase-file", str(passphrase_file))
    assert code == 0, stderr
    assert made is not None and made["format"] == "keystore" and made["encrypted"] is True
    assert made["address"] == made["public_key"] and len(str(made["public_key"])) == 64
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["kdf"]["n"] == DEFAULT_SCRYPT.n  # the CLI never weakens the KDF
    # show needs no passphrase
    code, shown, stderr = run_main(capsys, "keys", "show", str(out))
    assert code == 0 and shown == made, stderr
    # the key unlocks with the passphrase in the file (its trailing line break is not part of it)
    found = read_key_file(out)
    assert isinstance(found, Keystore)
    assert found.unlock("correct horse battery staple").public_key.hex() == made["public_key"]
    # an existing file is never overwritten
    before = out.read_bytes()
    code, _, stderr = run_main(capsys, "keys", "new", "--out", str(out), "--passphrase-file", str(passphrase_file))
    assert_error(code, stderr, f"{out}: the file exists; not overwriting a key file")
    assert out.read_bytes() == before
    # no passphrase file and no terminal to ask at
    code, _, stderr = run_main(capsys, "keys", "new", "--out", str(tmp_path / "second.json"))
    assert_error(code, stderr, "give --passphrase-file FILE, or run at a terminal to type it")
    assert not (tmp_path / "second.json").exists()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    code, _, stderr = run_main(capsys, "keys", "new", "--out", str(tmp_path / "third.json"), "--passphrase-file",
                               str(empty))  # fmt: skip
    assert_error(code, stderr, f"{empty}: the passphrase file is empty")
    code, _, stderr = run_main(capsys, "keys", "show", str(tmp_path / "absent"))
    assert_error(code, stderr, f"{tmp_path / 'absent'}: no such key file")


def test_keys_show_and_import_a_legacy_plaintext_key(
    tmp_path: Path, passphrase_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = tmp_path / "miner_key"
    legacy.write_text(SEED.hex() + "\n")
    public_key = PrivateKey(SEED).public_key.hex()
    code, shown, stderr = run_main(capsys, "keys", "show", str(legacy))
    assert code == 0, stderr
    assert shown == {"path": str(legacy), "public_key": public_key, "address": public_key, "format": "plaintext",
                     "encrypted": False}  # fmt: skip
    out = tmp_path / "miner.json"
    arguments = ("keys", "import", "--seed-file", str(legacy), "--out", str(out), "--passphrase-file",
                 str(passphrase_file))  # fmt: skip
    code, imported, stderr = run_main(capsys, *arguments)
    assert code == 0 and imported is not None and imported["public_key"] == public_key, stderr
    found = read_key_file(out)
    assert isinstance(found, Keystore) and found.unlock("correct horse battery staple").public_key.hex() == public_key
    code, _, stderr = run_main(capsys, *arguments)
    assert_error(code, stderr, f"{out}: the file exists")
    code, _, stderr = run_main(capsys, "keys", "import", "--seed-file", str(out), "--out", str(tmp_path / "x.json"),
                               "--passphrase-file", str(passphrase_file))  # fmt: skip
    assert_error(code, stderr, f"{out}: a keystore (encrypted) already")


def read_until(descriptor: int, wanted: bytes, deadline: float) -> bytes:
    seen = b""
    while wanted not in seen:
        assert time.monotonic() < deadline, seen
        ready, _, _ = select.select([descriptor], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(descriptor, 1024)
            except OSError:  # the other end closed
                break
            seen += chunk
    return seen


@pytest.mark.parametrize("second", ["s3cret phrase", "another"])
def test_keys_new_asks_twice_at_a_terminal(tmp_path: Path, second: str) -> None:
    out = tmp_path / "typed.json"
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", "import sys, node; sys.exit(node.main())", "keys", "new",
                                "--out", str(out)], cwd=ROOT, stdin=terminal, stderr=terminal,
                               stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
    os.close(terminal)
    try:
        deadline = time.monotonic() + 120
        read_until(controller, f"a passphrase for {out}: ".encode(), deadline)
        os.write(controller, b"s3cret phrase\n")
        read_until(controller, b"the same passphrase again: ", deadline)
        os.write(controller, second.encode() + b"\n")
        assert process.stdout is not None
        printed = process.stdout.read().decode()
        assert process.wait(timeout=120) == (0 if second == "s3cret phrase" else 2)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    if second == "s3cret phrase":
        found = read_key_file(out)
        assert isinstance(found, Keystore) and found.unlock("s3cret phrase").public_key.hex() in printed
    else:
        assert not out.exists()


# --- loading keys in the node and the miner ----------------------------------------------


def test_load_key_opens_keystores_and_warns_on_plaintext(
    tmp_path: Path, passphrase_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keystore = tmp_path / "validator.json"
    write_keystore(keystore, SEED, "correct horse battery staple", FAST)
    key = node.load_key(str(keystore), TESTNET_CHAIN, passphrase_file)
    assert key.public_key == PrivateKey(SEED).public_key
    other = tmp_path / "other.json"  # one passphrase file serves every keystore of a node
    write_keystore(other, bytes(32), "correct horse battery staple", FAST)
    assert node.load_key(str(other), TESTNET_CHAIN, passphrase_file).public_key == PrivateKey(bytes(32)).public_key
    wrong = tmp_path / "wrong"
    wrong.write_text("incorrect\n")
    with pytest.raises(node.UserError, match=f"{keystore}: wrong passphrase"):
        node.load_key(str(keystore), TESTNET_CHAIN, wrong)
    with pytest.raises(node.UserError, match=f"the passphrase of {keystore}: give --key-passphrase-file FILE"):
        node.load_key(str(keystore), TESTNET_CHAIN)
    legacy = tmp_path / "legacy"
    legacy.write_text(SEED.hex())
    with caplog.at_level(logging.WARNING, logger="potchain.keys"):
        assert node.load_key(str(legacy), TESTNET_CHAIN).public_key == key.public_key
    assert f"{legacy} holds an UNENCRYPTED key" in caplog.text
    assert f"potchain keys import --seed-file {legacy}" in caplog.text
    missing = tmp_path / "missing.json"
    with pytest.raises(node.UserError, match=f"{missing}: no such key file"):
        node.load_key(str(missing), TESTNET_CHAIN, passphrase_file)
    assert not missing.exists()


def test_a_missing_miner_key_is_created_as_a_keystore(tmp_path: Path, passphrase_file: Path) -> None:
    path = tmp_path / "miner_key"
    with pytest.raises(node.UserError, match=f"a passphrase for the new miner keystore {path}: give"):
        node.load_key(str(path), TESTNET_CHAIN, create=True)
    assert not path.exists()
    created = node.load_key(str(path), TESTNET_CHAIN, passphrase_file, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = read_key_file(path)
    assert isinstance(found, Keystore) and found.public_key == created.public_key
    assert node.load_key(str(path), TESTNET_CHAIN, passphrase_file, create=True).public_key == created.public_key


def test_devnet_name_keys_load_only_on_a_development_network() -> None:
    assert is_devnet_chain_id(DEVNET_CHAIN) and not is_devnet_chain_id(TESTNET_CHAIN)
    assert node.load_key("devnet:validator-0", DEVNET_CHAIN).public_key == devnet_key("validator-0").public_key
    for chain_id in (TESTNET_CHAIN, "my-network"):
        with pytest.raises(node.UserError, match=f"devnet:validator-0: devnet keys are derived from their names.*"
                           f"refused on chain '{chain_id}'"):  # fmt: skip
            node.load_key("devnet:validator-0", chain_id)


def test_node_and_miner_refuse_devnet_keys_on_the_testnet(tmp_path: Path) -> None:
    completed = run_process("node", "--datadir", str(tmp_path / "d"), "--genesis", str(TESTNET),
                            "--validator-key", "devnet:validator-0")  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    assert "devnet:validator-0: devnet keys are derived from their names" in completed.stderr
    assert "refused on chain 'potchain-testnet-1'" in completed.stderr
    completed = run_process("mine", "--rpc", "http://127.0.0.1:9", "--token", "t", "--genesis", str(TESTNET),
                            "--key", "devnet:miner-0")  # fmt: skip
    assert completed.returncode == 2 and "refused on chain 'potchain-testnet-1'" in completed.stderr, completed.stderr


def test_node_reads_the_key_passphrase_setting_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    keystore = tmp_path / "validator.json"
    write_keystore(keystore, SEED, "right", FAST)
    config = tmp_path / "node.toml"
    config.write_text(f'key_passphrase_file = "{tmp_path / "wrong"}"\nvalidator_key = ["{keystore}"]\n')
    (tmp_path / "wrong").write_text("wrong\n")
    args = node.build_parser().parse_args(["node", "--datadir", str(tmp_path / "d"), "--config", str(config)])
    assert node.node_settings(args)["key_passphrase_file"] == str(tmp_path / "wrong")
    completed = run_process("node", "--datadir", str(tmp_path / "d"), "--config", str(config))
    assert completed.returncode == 2, completed.stderr
    assert f"{keystore}: wrong passphrase, or the keystore was changed" in completed.stderr


# --- potchain genesis new and the shipped testnet ------------------------------------------


def test_genesis_new_builds_a_loadable_genesis_of_exactly_the_given_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [PrivateKey(bytes([index]) * 32).public_key.hex() for index in range(1, 4)]
    roots = [bytes([index]) * 32 for index in range(1, 3)]  # the validators' own shards' roots
    validators_file = tmp_path / "validators.json"
    validators_file.write_text(json.dumps({"note": "two of ours", "validators": [
        {"public_key": keys[2], "stake": 300, "heldout": {"root": roots[1].hex(), "sequences": 900}}]}))  # fmt: skip
    out = tmp_path / "net" / "genesis.json"
    out.parent.mkdir()
    code, made, stderr = run_main(capsys, "genesis", "new", "--chain-id", "acme-net-1", "--out", str(out),
                                  "--model", "devnet", "--timestamp", "1800000000",
                                  "--validator", f"{keys[0]}:100:{roots[0].hex()}:700",
                                  "--validator", f"{keys[1]}:200",
                                  "--validators-file", str(validators_file))  # fmt: skip
    assert code == 0 and made is not None, stderr
    genesis = load_genesis(out)
    assert made["genesis_hash"] == genesis.hash and made["validators"] == keys and made["total_stake"] == 600
    assert genesis.chain_id == "acme-net-1" and genesis.timestamp == 1800000000
    assert [(a.public_key.hex(), a.balance, a.stake) for a in genesis.accounts] == [
        (keys[0], 0, 100), (keys[1], 0, 200), (keys[2], 0, 300)]  # fmt: skip
    assert [a.heldout for a in genesis.accounts] == [
        HeldOutCommitment(roots[0], 700), None, HeldOutCommitment(roots[1], 900)]  # fmt: skip
    devnet = load_genesis(DEVNET)
    assert set(made) == {"genesis", "chain_id", "genesis_hash", "model", "timestamp", "validators", "total_stake",
                         "chunk_directory"}  # fmt: skip
    assert genesis.model == devnet.model and genesis.consensus == devnet.consensus
    assert (genesis.partition, genesis.evaluation, genesis.dataset) == (devnet.partition, devnet.evaluation,
                                                                        devnet.dataset)  # fmt: skip
    assert load_split(genesis.dataset, chunk_directory(out, genesis), "test")  # the corpus was copied beside it
    # By default: the testnet's model, and now as the genesis time.
    started = int(time.time())
    code, made, stderr = run_main(capsys, "genesis", "new", "--chain-id", "acme-net-2", "--out",
                                  str(out.with_name("second.json")), "--validator", f"{keys[0]}:100")  # fmt: skip
    assert code == 0 and made is not None, stderr
    second, testnet = load_genesis(out.with_name("second.json")), load_genesis(TESTNET)
    assert second.model == testnet.model and second.consensus == testnet.consensus
    assert started <= second.timestamp <= time.time()
    # The same command again refuses to overwrite it.
    code, _, stderr = run_main(capsys, "genesis", "new", "--chain-id", "acme-net-1", "--out", str(out),
                               "--validator", f"{keys[0]}:100")  # fmt: skip
    assert_error(code, stderr, f"{out}: the file exists; not overwriting a genesis")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--chain-id", "potchain-devnet-2"], "--chain-id: got 'potchain-devnet-2'; chain ids beginning with"),
        (["--chain-id", "Bad Name", "--validator", f"{'ab' * 32}:5"], "chain_id: 'Bad Name' does not match"),
        ([], "no validators: a genesis needs at least one"),
        (["--validator", "abcd"], "got no ':', want PUBLIC_KEY_HEX:STAKE"),
        (["--validator", "zz:5"], "want 64 hex characters"),
        (["--validator", f"{'ab' * 32}:0"], "stake 0, want an integer from 1"),
        (["--validator", f"{'ab' * 32}:-5"], "stake '-5' is not a decimal integer"),
        (["--validator", f"{'ab' * 32}:5", "--validator", f"{'ab' * 32}:6"], f"validator {'ab' * 32} appears twice"),
        (
            ["--validator", f"{devnet_key('validator-2').public_key.hex()}:5"],
            "the INSECURE devnet key devnet:validator-2",
        ),
        (["--validators-file", "absent.json"], "absent.json: cannot read the validators file"),
        (["--validator", f"{'ab' * 32}:5:{'cd' * 32}"], "got 3 ':'-separated parts, want 2 or 4"),
        (["--validator", f"{'ab' * 32}:5:{'CD' * 32}:9"], "heldout.root: got 'CDCD"),
        (["--validator", f"{'ab' * 32}:5:{'cd' * 31}:9"], "want 64 lowercase hex characters (a Merkle root)"),
        (["--validator", f"{'ab' * 32}:5:{'cd' * 32}:0"], "heldout.sequences: got 0, want an integer from 1"),
        (["--validator", f"{'ab' * 32}:5:{'cd' * 32}:x"], "held-out sequences 'x' is not a decimal integer"),
        (
            ["--validator", f"{'ab' * 32}:5:{devnet_commitment(2)}:681"],
            "commits to the INSECURE devnet-style shard 2 of 4 cut from the public test documents",
        ),
        (
            ["--validators-file", str(TESTNET_VALIDATORS)],
            "commits to the INSECURE testnet-style shard 0 of 4 cut from the public test documents",
        ),
    ],
)
def test_genesis_new_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    out = tmp_path / "genesis.json"
    if "--chain-id" not in arguments:
        arguments = ["--chain-id", "acme-net-1", *arguments]
    code, _, stderr = run_main(capsys, "genesis", "new", "--out", str(out), "--model", "devnet", *arguments)
    assert_error(code, stderr, message)
    assert not out.exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"validators": [], "comment": "x"}, "unknown field 'comment', want only validators and note"),
        ({"validators": [], "note": 5}, "note: got 5, want a string"),
        ({"validators": [{"public_key": "ab" * 32, "stake": 5, "bond": 1}]}, "want an object with public_key, stake"),
        (
            {"validators": [{"public_key": "ab" * 32, "stake": 5, "heldout": {"root": "cd" * 32}}]},
            "validators[0].heldout: got {'root': 'cdcd",
        ),
        (
            {"validators": [{"public_key": "ab" * 32, "stake": 5, "heldout": {"root": "cd" * 32, "sequences": 0}}]},
            "validators[0].heldout.sequences: got 0, want an integer from 1 to 1048576",
        ),
        (
            {"validators": [{"public_key": "ab" * 32, "stake": 5, "heldout": {"root": "cd" * 32, "sequences": True}}]},
            "validators[0].heldout.sequences: got True",
        ),
        (
            {"validators": [{"public_key": "ab" * 32, "stake": 5, "heldout": {"root": 7, "sequences": 3}}]},
            "validators[0].heldout.root: got 7, want 64 lowercase hex characters",
        ),
    ],
)
def test_a_bad_validators_file_is_named(tmp_path: Path, document: dict[str, object], message: str) -> None:
    path = tmp_path / "validators.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValidatorsError) as raised:
        read_validators_file(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_the_shipped_genesis_files_rebuild_from_their_public_keys() -> None:
    """`python -m genesis.build` writes these exact bytes: the testnet from genesis/testnet-validators.json."""
    for name, path in (("devnet", DEVNET), ("testnet", TESTNET)):
        document = genesis_document(NETWORKS[name], shipped_documents(), shipped_accounts(name))
        assert genesis_text(document) == path.read_text(), name
    testnet = load_genesis(TESTNET)
    validators = read_validators_file(TESTNET_VALIDATORS)
    assert [(a.public_key.hex(), a.stake) for a in testnet.accounts] == [
        (str(v["public_key"]), v["stake"]) for v in validators
    ]
    assert [a.heldout for a in testnet.accounts] == [
        HeldOutCommitment(bytes.fromhex(str(h["root"])), int(str(h["sequences"])))
        for h in (v["heldout"] for v in validators)
        if isinstance(h, dict)
    ]
    assert all(a.heldout is not None for a in testnet.accounts)
    refuse_name_keys(validators)  # none is a devnet name key
    devnet = load_genesis(DEVNET)
    assert [a.public_key for a in devnet.accounts] == [devnet_key(f"validator-{i}").public_key for i in range(4)]
    assert [a.stake for a in devnet.accounts] == [a.stake for a in testnet.accounts] == [1_000_000] * 4
    # A known limit (docs/spec.md, section 14): a genesis written by hand may stake name keys on any chain id.
    document = json.loads(DEVNET.read_text())
    document["chain_id"] = "acme-net-1"
    assert parse_genesis(json.dumps(document).encode()).accounts == devnet.accounts
    assert not any(path.suffix in (".key", ".keystore") for path in GENESIS_DIR.iterdir())
    assert not is_devnet_chain_id(testnet.chain_id)
