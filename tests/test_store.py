"""The LevelDB store: survives SIGKILL at any moment, and refuses to start on
a corrupt or foreign database."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import plyvel
import pytest

from chain import schema
from chain.blocks import Block, DecidedBody, decode_block
from chain.encoding import pack, unpack
from chain.store import CorruptStore
from chain.votes import Commit, decode_commit
from genesis import DEVNET
from node import command_replay
from p2p.decided_node import DecidedNode
from tests.conftest import ROOT, run_potchain

IMPORTER = """
import sys
from pathlib import Path
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from tests.test_store import read_height
node = DecidedNode(DEVNET, Path(sys.argv[1]))
for path in sorted(Path(sys.argv[2]).glob("*.decided")):
    block, commit, training = read_height(path)
    if block.header.height == node.head().block.header.height + 1:
        node.import_decided(block, commit, training)
node.close()
print("done", flush=True)
"""


def read_height(path: Path) -> tuple[Block, Commit, dict[bytes, Block]]:
    """One exported height: the decided block, its certificate, the training blocks it names."""
    block, commit, training = unpack(path.read_bytes(), "height")
    named = [decode_block(data) for data in training]
    return decode_block(block), decode_commit(commit), {b.hash: b for b in named}


@pytest.fixture(scope="module")
def exported_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The decided heights localnet reached with three confirmed updates, one file each
    (the block, its certificate and the training blocks it names)."""
    source = tmp_path_factory.mktemp("source")
    completed = run_potchain("localnet", "--datadir", str(source), "--finalize", "3", "--steps", "8")
    assert completed.returncode == 0, completed.stderr
    node = DecidedNode(DEVNET, source)
    exported = tmp_path_factory.mktemp("heights")
    for block in node.db.canonical_blocks():
        if not isinstance(block.body, DecidedBody):
            continue
        commit = node.commit_of(block.hash)
        assert commit is not None
        training = [node.db.block(v.training_block).encode() for v in block.body.training]
        (exported / f"{block.header.height:04d}.decided").write_bytes(pack([block.encode(), commit.encode(), training]))
    node.close()
    return exported


def replay(datadir: Path) -> dict[str, object]:
    return command_replay(argparse.Namespace(genesis=DEVNET, datadir=datadir, log_level="warning", log_format="text"))


@pytest.mark.slow
def test_sigkill_during_imports_leaves_a_store_that_restarts(exported_chain: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("POTCHAIN_TEST_SEED", time.time_ns() % 2**32))
    rounds = int(os.environ.get("POTCHAIN_CRASH_ROUNDS", 8))  # more for a longer hunt
    print(f"crash test seed {seed}, {rounds} rounds (replay with POTCHAIN_TEST_SEED={seed})")
    chooser = random.Random(seed)
    datadir = tmp_path / "node"
    heights_seen = set()
    for round_number in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", IMPORTER, str(datadir), str(exported_chain)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(chooser.uniform(0.5, 8.0))  # start-up alone takes 2-3 s: kills must reach the imports
        child.send_signal(signal.SIGKILL)
        stdout, stderr = child.communicate()
        assert b"Traceback" not in stderr, stderr.decode()

        node = DecidedNode(DEVNET, datadir)  # opens and checks the decided head
        head = node.db.head()
        head_height = node.db.block(head).header.height
        node.close()
        heights_seen.add(head_height)
        result = replay(datadir)
        assert result["head_hash"] == head.hex(), f"round {round_number}"
        if b"done" in stdout:
            shutil.rmtree(datadir)  # start over so later kills land mid-import again
    assert len(heights_seen) > 1, f"every kill left the head at {heights_seen}: the test exercised nothing"


def test_corrupt_or_foreign_store_is_refused(exported_chain: Path, tmp_path: Path) -> None:
    datadir = tmp_path / "node"
    node = DecidedNode(DEVNET, datadir)
    for path in sorted(exported_chain.glob("*.decided"))[:2]:
        node.import_decided(*read_height(path))
    head = node.db.head()
    node.close()

    # A missing state record for the head.
    db = plyvel.DB(str(datadir / "chain"))
    state = db.get(schema.state_key(head))
    db.delete(schema.state_key(head))
    db.close()
    with pytest.raises(CorruptStore, match=f"head block {head.hex()}: missing key s:{head.hex()}"):
        DecidedNode(DEVNET, datadir)
    completed = run_potchain("replay", "--datadir", str(datadir))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "head block" in completed.stderr

    # A database of another network.
    db = plyvel.DB(str(datadir / "chain"))
    db.put(schema.state_key(head), state)
    db.put(schema.META_GENESIS, bytes(32))
    db.close()
    with pytest.raises(CorruptStore, match="genesis 0000"):
        DecidedNode(DEVNET, datadir)

    # Garbage in LevelDB's own files.
    for path in (datadir / "chain").iterdir():
        if path.name.startswith("MANIFEST"):
            path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CorruptStore, match="LevelDB"):
        DecidedNode(DEVNET, datadir)
