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
from chain.store import CorruptStore
from genesis import DEVNET
from node import command_replay
from p2p.full_node import FullNode
from tests.conftest import ROOT, run_potchain

IMPORTER = """
import sys
from pathlib import Path
from chain.blocks import decode_block
from genesis import DEVNET
from p2p.full_node import FullNode
node = FullNode(DEVNET, Path(sys.argv[1]))
for path in sorted(Path(sys.argv[2]).glob("*.block")):
    data = path.read_bytes()
    if not node.db.has_block(decode_block(data).hash):
        node.import_block(data)
node.close()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def exported_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six blocks (three finalized training blocks) mined by localnet, one file each."""
    source = tmp_path_factory.mktemp("source")
    completed = run_potchain("localnet", "--datadir", str(source), "--finalize", "3", "--steps", "8")
    assert completed.returncode == 0, completed.stderr
    node = FullNode(DEVNET, source)
    exported = tmp_path_factory.mktemp("blocks")
    for block in node.db.canonical_blocks():
        (exported / f"{block.header.height:04d}.block").write_bytes(block.encode())
    node.close()
    return exported


def replay(datadir: Path) -> dict[str, object]:
    return command_replay(argparse.Namespace(genesis=DEVNET, datadir=datadir))


@pytest.mark.slow
def test_sigkill_during_imports_leaves_a_store_that_restarts(exported_chain: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("POTCHAIN_TEST_SEED", time.time_ns() % 2**32))
    print(f"crash test seed {seed} (replay with POTCHAIN_TEST_SEED={seed})")
    chooser = random.Random(seed)
    datadir = tmp_path / "node"
    heights_seen = set()
    for round_number in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", IMPORTER, str(datadir), str(exported_chain)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(chooser.uniform(0.5, 8.0))  # start-up alone takes 2-3 s: kills must reach the imports
        child.send_signal(signal.SIGKILL)
        stdout, stderr = child.communicate()
        assert b"Traceback" not in stderr, stderr.decode()

        node = FullNode(DEVNET, datadir)  # opens, checks, and re-validates a pending head
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
    node = FullNode(DEVNET, datadir)
    for path in sorted(exported_chain.glob("*.block"))[1:3]:
        node.import_block(path.read_bytes())
    head = node.db.head()
    node.close()

    # A missing state record for the head.
    db = plyvel.DB(str(datadir / "chain"))
    state = db.get(schema.state_key(head))
    db.delete(schema.state_key(head))
    db.close()
    with pytest.raises(CorruptStore, match=f"head block {head.hex()}: missing key s:{head.hex()}"):
        FullNode(DEVNET, datadir)
    completed = run_potchain("replay", "--datadir", str(datadir))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "head block" in completed.stderr

    # A database of another network.
    db = plyvel.DB(str(datadir / "chain"))
    db.put(schema.state_key(head), state)
    db.put(schema.META_GENESIS, bytes(32))
    db.close()
    with pytest.raises(CorruptStore, match="genesis 0000"):
        FullNode(DEVNET, datadir)

    # Garbage in LevelDB's own files.
    for path in (datadir / "chain").iterdir():
        if path.name.startswith("MANIFEST"):
            path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CorruptStore, match="LevelDB"):
        FullNode(DEVNET, datadir)


def test_localnet_then_replay_agree(exported_chain: Path, tmp_path: Path) -> None:
    completed = run_potchain("localnet", "--datadir", str(tmp_path), "--finalize", "2", "--steps", "8")
    assert completed.returncode == 0, completed.stderr
    summary = completed.json()
    assert summary["finalized_training_blocks"] == 2 and summary["finalized_height"] == 3
    assert float(summary["test_loss_head"]) < float(summary["test_loss_genesis"])  # type: ignore[arg-type]
    assert "[localnet] finalized 2/2" in completed.stderr
    replayed = run_potchain("replay", "--datadir", str(tmp_path))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.json()["state_root"] == summary["state_root"]
