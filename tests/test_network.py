"""Functional tests on real node processes: libp2p over loopback TCP, LevelDB, the RPC.

Each starts `potchain node` processes (sim/processes.py), drives them and
reads their state over the RPC, like an operator would.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from chain.crypto import devnet_key
from chain.state import State
from consensus.rules import genesis_state
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNodeConfig
from sim.adversaries import Adversary, forge_training_block
from sim.devnet import stop_all, wait_finalized
from sim.processes import NodeProcess
from tests.conftest import run_potchain
from training.tables import LOSS_BITS

pytestmark = pytest.mark.slow


def start(name: str, root: Path, *arguments: str, bootstrap: Sequence[NodeProcess] = ()) -> NodeProcess:
    flags = ["--rpc-port", "0", "--threads", "1", *arguments]
    for peer in bootstrap:
        flags += ["--bootstrap", peer.address]
    process = NodeProcess(name, root / name, flags)
    process.start()
    process.wait_started()
    return process


def start_miner_and_validator(root: Path) -> list[NodeProcess]:
    """A mining node with two of the devnet validators, and a node with the other two."""
    miner = start("miner", root, "--mine", "--miner-key", "devnet:miner-0",
                  "--validator-key", "devnet:validator-0", "--validator-key", "devnet:validator-1")  # fmt: skip
    try:
        validator = start("validator", root, "--validator-key", "devnet:validator-2",
                          "--validator-key", "devnet:validator-3", bootstrap=[miner])  # fmt: skip
    except BaseException:
        stop_all([miner])
        raise
    return [miner, validator]


def genesis_test_loss(tmp_path: Path) -> float:
    node = DecidedNode(DEVNET, tmp_path / "reference")
    try:
        state: State = genesis_state(node.genesis)
        return node.mean_losses(state)[1]
    finally:
        node.close()


def test_devnet_decides_on_every_node_and_stops_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "devnet"
    completed = run_potchain("devnet", "--nodes", "4", "--finalize", "5", "--out", str(out), timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.json()["agree"] is True
    summary = json.loads((out / "summary.json").read_text())
    nodes = summary["nodes"]
    assert len(nodes) == 4
    assert len({n["common_hash"] for n in nodes}) == 1  # the same block at the lowest common height
    assert all(n["finalized_height"] >= n["common_height"] >= 5 for n in nodes)
    assert all(n["peer_count"] >= 1 for n in nodes)
    assert set(summary["exit_codes"].values()) == {0}
    assert summary["propagation_seconds_max"] is not None
    assert all(n["test_loss"] < genesis_test_loss(tmp_path) for n in nodes)


def test_a_restarted_node_catches_up_to_the_same_decided_chain_and_state(tmp_path: Path) -> None:
    processes = start_miner_and_validator(tmp_path)
    miner, validator = processes
    try:
        follower = start("follower", tmp_path, bootstrap=[miner, validator])
        processes.append(follower)
        wait_finalized(processes, 3, timeout=300)

        assert follower.stop() == 0
        follower_height = 0
        stopped_at = miner.get("/v1/status")["finalized_height"]
        wait_finalized([miner, validator], stopped_at + 4, timeout=300)

        follower.start()  # same data directory: it reopens its store and syncs the rest
        follower.wait_started()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = follower.get("/v1/status")
            follower_height = status["finalized_height"]
            if follower_height >= stopped_at + 4:
                theirs = miner.get(f"/v1/blocks/{follower_height}")
                if theirs["hash"] == status["finalized_hash"]:
                    assert theirs["state_root"] == status["state_root"]
                    assert follower.get(f"/v1/blocks/{follower_height}")["commit"]["signing_stake"] * 3 > (
                        2 * theirs["commit"]["total_stake"]
                    )
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"the restarted node reached decided height {follower_height}, want {stopped_at + 4}")
    finally:
        assert set(stop_all(processes).values()) == {0}


def test_an_invalid_gossiped_block_is_rejected_and_its_sender_penalized(tmp_path: Path) -> None:
    processes = start_miner_and_validator(tmp_path)
    miner, validator = processes
    try:
        wait_finalized(processes, 1, timeout=300)
        honest = [miner, validator]

        node = DecidedNode(DEVNET, tmp_path / "spammer")
        spammer = Adversary(node, VotingNodeConfig(bootstrap=[p.address for p in honest]))
        key = devnet_key("mallory")

        def reasons(process: NodeProcess) -> list[str]:
            """The penalties `process` gave the spammer (a negative score)."""
            return [
                penalty["reason"]
                for peer in process.get("/v1/peers")["peers"]
                if peer["peer_id"] == spammer.peer_id and peer["score"] < 0
                for penalty in peer["penalties"]
            ]

        def every_honest_node_rejected() -> bool:
            return all(any("loss_after" in reason for reason in reasons(p)) for p in honest)

        async def attack() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spammer.run)
                await trio.sleep(3)  # connect and join the mesh
                for _ in range(8):
                    # Forge on the decided head the honest nodes build on, once the spammer has synced it.
                    with trio.move_on_after(10):
                        while True:
                            want = (await trio.to_thread.run_sync(miner.get, "/v1/status"))["head_hash"]
                            if spammer.node.head().block.hash.hex() == want:
                                break
                            await trio.sleep(0.2)
                    forged = await trio.to_thread.run_sync(forge_training_block, spammer.node, key, -1)
                    await spammer.announce(forged)
                    await trio.sleep(2)
                    if await trio.to_thread.run_sync(every_honest_node_rejected):
                        break
                spammer.stop()

        try:
            trio.run(attack)
        finally:
            node.close()
        assert every_honest_node_rejected(), [reasons(p) for p in honest]
        assert all(process.is_running() for process in honest)
        finalized = miner.get("/v1/status")["finalized_height"]
        wait_finalized(honest, finalized + 2, timeout=300)  # the chain goes on
    finally:
        assert set(stop_all(processes).values()) == {0}


def test_an_external_miner_mines_through_the_rpc(tmp_path: Path) -> None:
    validators = [arg for i in range(4) for arg in ("--validator-key", f"devnet:validator-{i}")]
    node = start("node", tmp_path, *validators)
    try:
        token = str(node.datadir / "rpc_token")
        (tmp_path / "passphrase").write_text("miner passphrase\n")
        completed = run_potchain("mine", "--rpc", node.rpc, "--token-file", token, "--key", str(tmp_path / "key"),
                                 "--key-passphrase-file", str(tmp_path / "passphrase"),  # the key is created
                                 "--blocks", "2", "--steps", "10", "--state", str(tmp_path / "miner.pt"),
                                 timeout=600)  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert completed.json()["submitted"] == 2
        assert (tmp_path / "miner.pt").exists()
        # A progress line per training round (stderr is no terminal): its speed and mean training loss.
        rounds = re.findall(r"job=mining done=(\d+) .*tokens_per_second=(\d+) loss=([0-9.]+)", completed.stderr)
        assert rounds and all(int(speed) > 0 and 0 < float(loss) < 8 for _, speed, loss in rounds), completed.stderr
        wait_finalized([node], 3, timeout=120)
        miner = completed.json()["miner"]
        assert node.get(f"/v1/accounts/{miner}")["balance"] > 0
        # The running node's RPC: health, its OpenAPI document, and weights that reproduce its loss.
        assert node.get("/health") == {"status": "synced"}
        assert "/v1/mining/submit" in node.get("/openapi.json")["paths"]
        with urllib.request.urlopen(node.rpc + "/metrics") as response:  # Prometheus's text format
            metrics = {sample.name: sample for family in text_string_to_metric_families(response.read().decode())
                       for sample in family.samples}  # fmt: skip
        assert metrics["potchain_head_height"].value >= 3 and metrics["potchain_evaluation_seconds_count"].value > 0
        status = node.get("/v1/status")
        weights_path = tmp_path / "head.safetensors"
        with urllib.request.urlopen(node.rpc + "/v1/model/weights") as response:
            weights_path.write_bytes(response.read())
        evaluated = run_potchain("eval", "--weights", str(weights_path), "--split", "validation", "--seed", "0")
        report = DecidedNode(DEVNET, tmp_path / "reference")
        tokens = report.genesis.evaluation.validation_sequences * report.genesis.model.context
        report.close()
        assert (
            round(int(str(evaluated.json()["loss_total"])) / tokens / (1 << LOSS_BITS), 5) == status["validation_loss"]
        )
        missing = run_potchain("mine", "--rpc", node.rpc, "--key", str(tmp_path / "key"), "--blocks", "1")
        assert missing.returncode == 2 and "RPC token" in missing.stderr
    finally:
        assert set(stop_all([node]).values()) == {0}


def test_a_devnet_stopped_with_sigterm_stops_its_nodes(tmp_path: Path) -> None:
    """`potchain devnet` ended by SIGTERM (a service manager, `kill`) stops every node it
    started, as Ctrl-C does, instead of leaving them running."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "devnet"
    command = [sys.executable, "-c", "import sys, node; sys.exit(node.main())", "devnet", "--nodes", "2",
               "--out", str(out)]  # fmt: skip
    devnet = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        infos = [out / f"node{i}" / "node.json" for i in range(2)]
        while not all(info.exists() for info in infos):
            assert devnet.poll() is None and time.monotonic() < deadline, devnet.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            time.sleep(0.5)
        pids = [json.loads(info.read_text())["pid"] for info in infos]
        devnet.send_signal(signal.SIGTERM)
        devnet.wait(timeout=120)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["exit_codes"].values()) == {0}
    finally:
        if devnet.poll() is None:
            devnet.kill()
