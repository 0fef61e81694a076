"""Disk full and power loss: every file the node writes is replaced atomically
(chain/files.py), and a failed database write leaves memory and disk in step
(chain/store.py StorageError, p2p/decided_node.py).

The full-disk tests put the data directory on a small tmpfs. Mounting one needs
root: as root (CI) the test mounts it itself; otherwise it runs itself again as
root of a new user and mount namespace (`unshare -rm`), and fails, naming the
reason, where neither works. Every mount is unmounted in a `finally`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chain.blocks import Block
from chain.files import PUBLIC_MODE, SECRET_MODE, leftover_pattern, remove_leftovers, write_atomically
from chain.state import State
from chain.store import StorageError
from consensus.decisions import propose_decided_block
from consensus.proposals import propose_training_block
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.replay import replay_decided_chain
from sim.processes import NodeProcess
from tests.chain_builders import Scenario, certificate, decide_next, devnet_test_shard
from tests.conftest import ROOT, run_potchain

# --- a small disk --------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: 16m) mounted at `path` for the block's duration."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"mounting a {size} tmpfs at {path} failed: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        unmounted = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if unmounted.returncode != 0:  # a file still open: detach it now, it goes when closed
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def free_bytes(path: Path) -> int:
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    size = free_bytes(disk) - leave
    assert size > 0, f"{disk}: {free_bytes(disk)} bytes free, cannot leave {leave}"
    with filler.open("wb") as handle:
        handle.truncate(0)
        for _ in range(size // (1 << 20)):
            handle.write(bytes(1 << 20))
        handle.write(bytes(size % (1 << 20)))
    return filler


def as_root(test: Callable[[Path], None], tmp_path: Path, node_id: str) -> None:
    """Run `test(tmp_path)` as root: here if this process is root, else this test alone
    again in `unshare -rm` (root of its own user and mount namespace)."""
    if os.geteuid() == 0:
        test(tmp_path)
        return
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"mounting a small disk needs root or `unshare -rm` (user namespaces): {probe.stderr.strip()}")
    completed = subprocess.run(
        ["unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]


# --- the atomic write ------------------------------------------------------------------


def test_a_write_replaces_the_file_whole_with_its_mode_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "record"
    write_atomically(path, b"first", PUBLIC_MODE)
    write_atomically(path, b"second", SECRET_MODE)
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == SECRET_MODE
    write_atomically(path, b"third", PUBLIC_MODE)
    assert stat.S_IMODE(path.stat().st_mode) == PUBLIC_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["record"]
    with pytest.raises(ValueError, match="mode: got 4600"):
        write_atomically(path, b"x", 0o4600)
    with pytest.raises(TypeError, match="data: got str, want bytes"):
        write_atomically(path, "text", PUBLIC_MODE)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=f"writing {tmp_path / 'missing' / 'record'}"):
        write_atomically(tmp_path / "missing" / "record", b"x", PUBLIC_MODE)
    assert path.read_bytes() == b"third"


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "node_key"
    write_atomically(path, b"key", SECRET_MODE)
    leftovers = [tmp_path / "node_key.k2x9q1zz.tmp", tmp_path / "node_key.a_b1c2d3.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    others = [tmp_path / "node_key.tmp", tmp_path / "other.k2x9q1zz.tmp", tmp_path / "node_key.bak"]
    for other in others:
        other.write_bytes(b"not a leftover")
    assert leftover_pattern(path) == "node_key.*.tmp"
    assert remove_leftovers(path) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["node_key", *(o.name for o in others)])
    assert path.read_bytes() == b"key"


WRITER = """
import sys
from pathlib import Path
from chain.blocks import Block
from chain.files import PUBLIC_MODE, write_atomically
path, size = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
for index in range(1_000_000):
    write_atomically(path, bytes([index % 251]) * size, PUBLIC_MODE)
"""


def test_a_write_killed_at_any_moment_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    """A process rewriting a 4 MB file in a loop, SIGKILLed at random moments: the file
    is always one whole version, and the next write goes through."""
    seed = int(os.environ.get("POTCHAIN_TEST_SEED", time.time_ns() % 2**32))
    print(f"kill test seed {seed} (replay with POTCHAIN_TEST_SEED={seed})")
    chooser = random.Random(seed)
    path, size = tmp_path / "record", 4 << 20
    write_atomically(path, bytes(size), PUBLIC_MODE)
    versions = set()
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(size)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(chooser.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        data = path.read_bytes()
        assert len(data) == size and data == bytes([data[0]]) * size, "a torn file"
        versions.add(data[0])
        remove_leftovers(path)
        assert [p.name for p in tmp_path.iterdir()] == ["record"]
    assert len(versions) > 1, "every kill landed before the first write: the test exercised nothing"


def check_full_disk_write(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        path = disk / "node.json"
        write_atomically(path, b"old", PUBLIC_MODE)
        with pytest.raises(OSError, match=f"writing {path}: No space left on device") as raised:
            write_atomically(path, bytes(2 << 20), PUBLIC_MODE)
        assert raised.value.errno == errno.ENOSPC
        assert path.read_bytes() == b"old"
        assert [p.name for p in disk.iterdir()] == ["node.json"], "the failed write's temporary file stays"


def test_a_write_to_a_full_disk_fails_naming_the_file_and_leaves_it_as_it_was(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    as_root(check_full_disk_write, tmp_path, request.node.nodeid)


# --- a full disk under the decided node --------------------------------------------------


def quick_training_block(scenario: Scenario, parent: Block, state: State) -> Block:
    """A valid training block of 3 optimizer steps (the devnet's difficulty needs no more)."""
    values = scenario.trained_values(parent, state, steps=3)
    timestamp = parent.header.timestamp + 10
    return propose_training_block(scenario.chain, parent, state, scenario.miner, values, timestamp, 3)


def check_full_disk_under_the_decided_node(tmp_path: Path) -> None:
    scenario = Scenario.create(tmp_path / "builder")
    keys = scenario.validators
    try:
        with small_disk(tmp_path / "disk", "16m") as disk:
            node = DecidedNode(DEVNET, disk / "node")
            try:
                filler = fill(disk, 350_000)  # room for one decided height with an update (about 225 kB)
                failure, height = None, 0
                while failure is None and height < 4:
                    head = node.head()
                    training = quick_training_block(scenario, head.block, head.state)
                    assert node.on_training_block(training)
                    stored = node.db.dump()
                    try:
                        decide_next(node, keys[height % 4], keys, training)
                        height += 1
                    except StorageError as error:
                        failure = error
                assert failure is not None, "the disk never filled up"
                assert height >= 1, "the disk was full at the first height: the filler left too little room"
                assert str(failure).startswith(f"{disk / 'node' / 'chain'}: writing height {height + 1}: IO error: ")
                assert str(failure).endswith("No space left on device")

                # Memory and disk in step: the node is exactly as before the failed write.
                assert node.head() is head and head.block.header.height == height
                assert list(node.decided.training) == [training.hash]
                assert node.db.dump() == stored and node.db.head() == head.block.hash
                assert node.block_at(height + 1) is None and not node.is_canonical(training)

                # Later writes are refused with the first failure's reason; the voting's decision
                # (the decided chain already advanced) is taken back.
                with pytest.raises(StorageError, match=r"refused, an earlier write failed \(writing height"):
                    decide_next(node, keys[height % 4], keys, training)
                block = propose_decided_block(
                    node.chain, head.block, head.state, keys[0], [training], head.commit,
                    node.decided.head_validators, (), devnet_test_shard(keys[0].public_key),
                )  # fmt: skip
                decision = node.decided.on_decided(block, certificate(node, block, keys), {training.hash: training})
                with pytest.raises(StorageError, match="refused"):
                    node.store(decision)
                assert node.head() is head and node.db.dump() == stored
            finally:
                node.close()

            filler.unlink()  # space freed: the node restarts at the last stored height, which replays
            node = DecidedNode(DEVNET, disk / "node")
            try:
                assert node.head().block == head.block
                first_state = node.db.state(node.genesis_block.hash)
                replayed = replay_decided_chain(node.db, node.chain, node.genesis_block, first_state)
                assert (replayed.head, replayed.state.root, replayed.decided_blocks) == (
                    head.block,
                    head.state.root,
                    height,
                )
                block = decide_next(node, keys[height % 4], keys, None)
                assert node.db.head() == block.hash and node.block_at(height + 1) == block
            finally:
                node.close()
    finally:
        scenario.node.close()


@pytest.mark.slow
def test_a_full_disk_under_the_decided_node_leaves_memory_and_disk_in_step(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    as_root(check_full_disk_under_the_decided_node, tmp_path, request.node.nodeid)


# --- a full disk under `potchain node` ------------------------------------------------------

NODE_FLAGS = ["--rpc-port", "0", "--threads", "1", "--steps", "4", "--mine", "--miner-key", "devnet:miner-0",
              *[flag for index in range(4) for flag in ("--validator-key", f"devnet:validator-{index}")]]  # fmt: skip
"""One node with the four devnet validators and a miner: it decides heights with updates alone."""


def check_full_disk_under_a_node_process(tmp_path: Path) -> None:
    datadir = tmp_path / "node"
    process = NodeProcess("node", datadir, NODE_FLAGS)
    with small_disk(datadir / "chain", "16m") as disk:  # the database alone: the log stays readable
        try:
            process.start()
            process.wait_started()
            filler = fill(disk, 350_000)  # room for about one more height with an update
            assert process.process is not None
            code = process.process.wait(timeout=400)
        finally:
            process.stop()
        log = process.log_path.read_text()
        decided = [int(height) for height in re.findall(r'msg="decided height (\d+) ', log)]
        assert code == 1, log[-3000:]
        assert f"potchain: error: stopped at height {decided[-1]}: " in log
        # The first write to fail is the next height's: its decision, or a block a key keeps before
        # signing for it (pending blocks, written before the decision).
        what = r"(writing|keeping \d+ pending block\(s\) at) height (\d+): IO error: "
        failed = re.search(re.escape(str(disk)) + ": " + what, log)
        assert failed is not None and int(failed.group(2)) == decided[-1] + 1, log[-3000:]
        assert "No space left on device" in log

        filler.unlink()  # space freed: the store opens at the last height the node logged, and replays
        node = DecidedNode(DEVNET, datadir)
        try:
            assert node.head().block.header.height == decided[-1], "memory and disk parted"
        finally:
            node.close()
        replayed = run_potchain("replay", "--datadir", str(datadir))
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.json()["decided_blocks"] == decided[-1]


@pytest.mark.slow
def test_a_full_disk_stops_a_node_process_with_its_reason_and_the_store_replays(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    as_root(check_full_disk_under_a_node_process, tmp_path, request.node.nodeid)
