"""The command line: user errors are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import lzma
import re
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import plyvel
import pytest
import torch
from safetensors.numpy import save_file

import node
from chain import schema
from chain.blocks import DecidedBody
from chain.crypto import devnet_key
from chain.heldout import save_shard, shard_from_text
from chain.votes import decode_commit
from consensus.genesis import Genesis
from genesis import DEVNET, GENESIS_DIR, devnet_shard, load_genesis
from p2p.decided_node import DecidedNode
from p2p.localnet import LocalVoting
from p2p.voting import BuildBlock
from tests.chain_builders import write_retired_store
from tests.conftest import ROOT, Completed, run_potchain
from training.weights import save_weights


def assert_user_error(completed: object, *fragments: str) -> None:
    assert completed.returncode == 2, completed.stdout  # type: ignore[attr-defined]
    stderr: str = completed.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("potchain: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def copy_genesis(tmp_path: Path) -> Path:
    shutil.copytree(GENESIS_DIR / "data", tmp_path / "data")
    target = tmp_path / "devnet.json"
    shutil.copy(DEVNET, target)
    return target


def test_eval_prints_one_json_line() -> None:
    completed = run_potchain("eval", "--genesis", "genesis/devnet.json", "--split", "test", "--seed", "3")
    assert completed.returncode == 0, completed.stderr
    result = completed.json()
    assert result["split"] == "test" and result["tokens"] == 32 * 128
    assert isinstance(result["loss_total"], int) and len(str(result["per_token_sha256"])) == 64


def test_eval_of_saved_weights_matches_in_process(devnet: Genesis, tmp_path: Path) -> None:
    weights = devnet.initial_weights()
    changed = weights.replace({"ln_f.weight": (weights.tensors["ln_f.weight"] // 2).astype(np.int16)})
    save_weights(changed, tmp_path / "w.safetensors")
    original = run_potchain("eval", "--seed", "1").json()
    loaded = run_potchain("eval", "--seed", "1", "--weights", str(tmp_path / "w.safetensors")).json()
    assert loaded["loss_total"] != original["loss_total"]


def test_corrupt_chunk(devnet: Genesis, tmp_path: Path) -> None:
    genesis_path = copy_genesis(tmp_path)
    document = devnet.dataset.split_documents("validation")[0]
    digest = document.chunks[0]
    chunk = tmp_path / "data" / "shakespeare" / f"{digest}.xz"
    data = bytearray(lzma.decompress(chunk.read_bytes()))
    data[0] ^= 0x20
    chunk.write_bytes(lzma.compress(bytes(data)))
    completed = run_potchain("eval", "--genesis", str(genesis_path), "--split", "validation")
    assert_user_error(completed, f"chunk {digest}", document.name, "sha256 mismatch")


def test_genesis_with_missing_or_wrong_field(tmp_path: Path) -> None:
    genesis_path = copy_genesis(tmp_path)
    document = json.loads(genesis_path.read_text())
    del document["model"]["layers"]
    genesis_path.write_text(json.dumps(document))
    assert_user_error(run_potchain("eval", "--genesis", str(genesis_path)), "model.layers: missing")
    document = json.loads(DEVNET.read_text())
    document["evaluation"]["validation_sequences"] = "many"
    genesis_path.write_text(json.dumps(document))
    assert_user_error(run_potchain("eval", "--genesis", str(genesis_path)), "evaluation.validation_sequences")
    assert_user_error(run_potchain("eval", "--genesis", str(tmp_path / "absent.json")), "cannot read genesis")


def test_weights_of_wrong_shape_or_exponent(devnet: Genesis, tmp_path: Path) -> None:
    weights = devnet.initial_weights()
    tensors = {name: np.ascontiguousarray(v) for name, v in weights.tensors.items()}
    exponents = dict(devnet.exponents)
    tensors["wpe.weight"] = np.zeros((64, 64), dtype=np.int16)
    path = tmp_path / "shape.safetensors"
    save_file(tensors, str(path), {"format": "potchain-canonical-weights-1", "exponents": json.dumps(exponents)})
    assert_user_error(run_potchain("eval", "--weights", str(path)), "wpe.weight: shape (64, 64), want (128, 64)")

    tensors = {name: np.ascontiguousarray(v) for name, v in weights.tensors.items()}
    exponents["h.2.attn.c_attn.weight"] = 13
    path = tmp_path / "exponent.safetensors"
    save_file(tensors, str(path), {"format": "potchain-canonical-weights-1", "exponents": json.dumps(exponents)})
    assert_user_error(run_potchain("eval", "--weights", str(path)), "h.2.attn.c_attn.weight: exponent 13")


def test_bad_arguments() -> None:
    assert_user_error(run_potchain("eval", "--threads", "0"), "--threads must be at least 1")
    assert_user_error(run_potchain("eval", "--seed", "-1"), "seed -1")
    scenario = str(ROOT / "sim" / "scenarios" / "honest.toml")
    assert_user_error(run_potchain("sim", "--scenario", scenario, "--out", "unused", "--finalize", "0"),
                      "--finalize must be at least 1, got 0")  # fmt: skip
    if not torch.cuda.is_available():
        assert_user_error(run_potchain("eval", "--device", "cuda"), "no CUDA device")
        assert_user_error(run_potchain("mine", "--rpc", "http://127.0.0.1:9", "--device", "cuda"), "no CUDA device")


def test_a_bad_proposal_wait_is_refused(tmp_path: Path) -> None:
    completed = run_potchain("node", "--datadir", str(tmp_path / "a"), "--proposal-wait", "-1")
    assert_user_error(completed, "proposal_wait must be a number of seconds from 0 to 600, got -1.0")
    config = tmp_path / "node.toml"
    config.write_text('proposal_wait = "long"\n')
    completed = run_potchain("node", "--datadir", str(tmp_path / "b"), "--config", str(config))
    assert_user_error(completed, "proposal_wait must be a number of seconds from 0 to 600, got 'long'")


def test_a_validator_key_file_must_exist_and_an_unstaked_key_is_named(tmp_path: Path) -> None:
    """A mistyped validator key path is an error (it once made a fresh, unstaked key, and the
    validator silently never voted); a key without stake starts, with a warning naming it."""
    import signal
    import subprocess
    import sys
    import time

    from chain.crypto import devnet_key

    missing = tmp_path / "validator.key"
    completed = run_potchain("node", "--datadir", str(tmp_path / "a"), "--validator-key", str(missing))
    assert_user_error(completed, f"{missing}: no such key file")
    assert not missing.exists()

    command = [sys.executable, "-c", "import sys, node; sys.exit(node.main())", "node", "--datadir",
               str(tmp_path / "b"), "--validator-key", "devnet:nobody"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            seen.append(line)
            if "has no stake" in line or not line:
                break
        assert f"validator key {devnet_key('nobody').public_key.hex()} has no stake" in "".join(seen), seen[-5:]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_a_heldout_file_must_read_and_match_a_validator_key_s_commitment(
    devnet: Genesis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`potchain node --heldout-file`: a missing file, one that is not a shard, one of another
    sequence length and one whose root is no --validator-key's commitment are refused, each
    naming the file, before the node starts."""

    def start(*extra: str) -> Completed:
        arguments = ("node", "--datadir", str(tmp_path / "node"), "--validator-key", "devnet:validator-0", *extra)
        return run_in_process(capsys, *arguments)

    missing = tmp_path / "missing.shard"
    assert_user_error(start("--heldout-file", str(missing)), f"{missing}: cannot read the held-out shard")
    garbage = tmp_path / "garbage.shard"
    garbage.write_bytes(b"not a shard")
    assert_user_error(start("--heldout-file", str(garbage)), f"{garbage}: not a held-out shard file")
    length = devnet.model.context + 1
    short = tmp_path / "short.shard"
    save_shard(shard_from_text(bytes(range(256)) * 4, length - 1), short)
    assert_user_error(start("--heldout-file", str(short)), f"{short}: sequences of {length - 1} bytes, want {length}")
    private = tmp_path / "private.shard"
    shard = shard_from_text(b"text nobody has seen " * 100, length)
    save_shard(shard, private)
    assert_user_error(start("--heldout-file", str(private)), f"{private}: root {shard.root.hex()}",
                      "not the held-out commitment in genesis of any --validator-key")  # fmt: skip
    # Validator 1's own shard, given to a node holding only validator 0's key, is refused too.
    other = devnet_shard(devnet, DEVNET, devnet_key("validator-1").public_key)
    assert other is not None
    save_shard(other, private)
    assert_user_error(start("--heldout-file", str(private)), "any --validator-key")
    assert node.load_heldout_shards([str(private)], devnet, [devnet_key("validator-1")]) == {
        devnet_key("validator-1").public_key: other
    }


# --- localnet and replay on the decided chain ------------------------------------------


@pytest.fixture(scope="module")
def localnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Completed, Completed]:
    """A decided chain made by localnet: one confirmed update, then a restart on the same
    data directory that goes on to two. Returns the datadir and both runs."""
    datadir = tmp_path_factory.mktemp("localnet")
    runs = []
    for finalize in ("1", "2"):
        completed = run_potchain("localnet", "--datadir", str(datadir), "--finalize", finalize, "--steps", "8")
        assert completed.returncode == 0, completed.stderr
        runs.append(completed)
    return datadir, runs[0], runs[1]


def test_localnet_decides_heights_goes_on_after_a_restart_and_replay_agrees(
    localnet: tuple[Path, Completed, Completed],
) -> None:
    datadir, first, second = localnet
    first_head, summary = first.json()["head_height"], second.json()
    head_height = summary["head_height"]
    assert isinstance(first_head, int) and isinstance(head_height, int)
    assert first.json()["finalized_training_blocks"] == 1
    assert summary["finalized_training_blocks"] == 2
    assert summary["finalized_height"] == head_height and head_height >= 2
    progress = re.findall(r"^\[localnet\] finalized \d+/2 height (\d+) ", second.stderr, re.MULTILINE)
    assert progress and int(progress[0]) == first_head + 1  # the restart went on from the stored head
    assert "[localnet] finalized 2/2" in second.stderr
    assert float(summary["test_loss_head"]) < float(summary["test_loss_genesis"])  # type: ignore[arg-type]
    assert {"validation_loss_genesis", "validation_loss_head"} <= summary.keys()

    replayed = run_potchain("replay", "--datadir", str(datadir))
    assert replayed.returncode == 0, replayed.stderr
    result = replayed.json()
    assert result["state_root"] == summary["state_root"] and result["head_hash"] == summary["head_hash"]
    assert result["decided_blocks"] == head_height
    # The miner commits before a height is decided and reveals on the block that carries the
    # commitment: the first height of each run carries a commitment and names no training block.
    stored = DecidedNode(DEVNET, datadir)
    try:
        named = [stored.block_at(height).body.training for height in range(1, head_height + 1)]  # type: ignore[union-attr]
    finally:
        stored.close()
    assert named[0] == () and result["blocks"] == head_height + sum(len(training) for training in named)
    # Each confirmed update was committed to, so each paid the miner its share.
    consensus = load_genesis(DEVNET).consensus
    share = consensus.block_reward * consensus.miner_share_percent // 100
    assert (first.json()["miner_balance"], summary["miner_balance"]) == (share, 2 * share)


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> Completed:
    """`potchain ARGS` in this process (no interpreter start-up): for commands that fail early."""
    capsys.readouterr()
    returncode = node.main(args)
    captured = capsys.readouterr()
    return Completed(returncode, captured.out, captured.err)


def test_replay_refuses_a_corrupted_store(
    localnet: tuple[Path, Completed, Completed], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = localnet[0]

    # A commit certificate with one signature changed.
    datadir = tmp_path / "commit"
    shutil.copytree(source, datadir)
    db = plyvel.DB(str(datadir / "chain"))
    first = db.get(schema.canonical_key(1))
    commit = decode_commit(db.get(schema.commit_key(first)))
    validator, timestamp, signature = commit.signatures[0]
    changed = (validator, timestamp, bytes([signature[0] ^ 1]) + signature[1:])
    db.put(schema.commit_key(first), dataclasses.replace(commit, signatures=(changed, *commit.signatures[1:])).encode())
    db.close()
    completed = run_in_process(capsys, "replay", "--datadir", str(datadir))
    assert_user_error(completed, "commit certificate of height 1 is invalid")

    # Another block stored under the first decided block's hash.
    datadir = tmp_path / "block"
    shutil.copytree(source, datadir)
    db = plyvel.DB(str(datadir / "chain"))
    first, second = db.get(schema.canonical_key(1)), db.get(schema.canonical_key(2))
    db.put(schema.block_key(first), db.get(schema.block_key(second)))
    db.close()
    assert_user_error(run_in_process(capsys, "replay", "--datadir", str(datadir)), "height 1", second.hex())


def test_replay_refuses_a_store_of_the_retired_validation_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data directory whose head is a validation block (kind 2, retired with the attestation finality)."""
    assert_user_error(run_in_process(capsys, "replay", "--datadir", str(tmp_path)), "no chain database here")
    head = write_retired_store(tmp_path)
    completed = run_in_process(capsys, "replay", "--datadir", str(tmp_path))
    assert_user_error(completed, f"head block {head.hex()}: header: kind 2 is retired", "validation block")


def test_localnet_voting_fires_timers_when_a_proposer_stays_silent(devnet: Genesis, tmp_path: Path) -> None:
    """localnet's voting (p2p/localnet.py) without training blocks: round 0's proposer never
    builds its block, so the height decides in a later round on the timers alone."""
    decided = DecidedNode(DEVNET, tmp_path)
    try:
        local = LocalVoting.open(decided, node.validator_keys(devnet))
        local.start()
        local.pending = deque(effect for effect in local.pending if not isinstance(effect, BuildBlock))
        first = local.decide_height()
        assert first.commit is not None and first.commit.round >= 1 and local.clock_ms > 0
        second = local.decide_height()
        assert second.block.header.parent == first.block.hash and decided.db.head() == second.block.hash
        assert isinstance(second.block.body, DecidedBody) and second.block.body.last_commit == first.commit
    finally:
        decided.close()
