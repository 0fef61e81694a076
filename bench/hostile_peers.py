"""Finality under hostile peers: each attack against the same network without it, in one run.

    python bench/hostile_peers.py [--seconds 90] [--identities 4]

Two `potchain node` processes on loopback decide heights: one mines and holds
devnet validators 0 and 1, the other holds validators 2 and 3 (both are
needed for a quorum, so a stall at either stops the chain). Peers without
stake (sim/adversaries/hostile.py), run in this process, attack both. Phases
of `--seconds` each:

1. baseline: no attack;
2. withheld: `--identities` peers at once announce training blocks on the
   head every half second and never serve them; a banned one is replaced by
   a fresh identity;
3. invalid: as many peers announce false training blocks (a perturbed slice,
   a claimed gain: each costs the victim a full evaluation), replaced when
   banned;
4. sync-flood: as many peers send `decided` requests as fast as streams open;
5. baseline again;
6. bomb: a peer whose status claims a far higher head answers `decided` with
   16 MiB of nested empty arrays; the victims' resident memory (from /proc)
   and the time their RPC takes to answer /health are sampled throughout,
   against the same samples over the baseline phases.

Prints one JSON line: per phase the heights decided per minute and the ratio
to the mean of the two baselines; per attack the identities banned and the
messages each sent before its first ban; for the bomb the peak memory over
the baseline's and the slowest /health answer. Targets (issue 12): the
finality ratio >= 0.8 under the withheld and invalid attacks, memory under
2x its baseline and the RPC never stalled over 1 s by the bomb.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from chain.crypto import devnet_key
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNodeConfig
from p2p.wire import Request
from sim.adversaries.hostile import HostilePeer, decode_bomb
from sim.devnet import stop_all, wait_finalized
from sim.processes import NodeProcess


def start_network(directory: Path) -> list[NodeProcess]:
    common = ["--rpc-port", "0", "--threads", "1"]
    miner = NodeProcess("miner", directory / "miner", [*common, "--mine", "--miner-key", "devnet:miner-0",
                        "--validator-key", "devnet:validator-0", "--validator-key", "devnet:validator-1"])  # fmt: skip
    miner.start()
    miner.wait_started()
    validators = ["--validator-key", "devnet:validator-2", "--validator-key", "devnet:validator-3"]
    validator = NodeProcess("validator", directory / "validator", [*common, "--bootstrap", miner.address, *validators])
    validator.start()
    validator.wait_started()
    return [miner, validator]


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Bench:
    def __init__(self, directory: Path, victims: list[NodeProcess], identities: int) -> None:
        self.directory = directory
        self.victims = victims
        self.identities = identities
        self.count = 0
        self.stores: list[DecidedNode] = []
        self.tracker: HostilePeer | None = None
        self.memory: dict[str, list[int]] = {"baseline": [], "bomb": []}
        self.health: dict[str, list[float]] = {"baseline": [], "bomb": []}

    def height(self) -> int:
        return min(int(v.get("/v1/status")["head_height"]) for v in self.victims)

    def banned_by(self, peer_id: str) -> int | None:
        """If a victim has banned the peer: the penalties it gave the peer (the messages
        that cost it work); None while no victim has."""
        for victim in self.victims:
            for peer in victim.get("/v1/peers")["peers"]:
                if peer["peer_id"] == peer_id and peer["banned"]:
                    return len(peer["penalties"])
        return None

    async def identity(self, nursery: trio.Nursery, follow: bool = False) -> HostilePeer:
        """A fresh peer id connected to both victims (forging on the tracker's head unless `follow`)."""
        self.count += 1
        store = DecidedNode(DEVNET, self.directory / f"hostile{self.count}")
        self.stores.append(store)
        source = None if follow or self.tracker is None else self.tracker.node
        config = VotingNodeConfig(bootstrap=[v.address for v in self.victims])
        peer = HostilePeer(store, config, devnet_key(f"hostile-{self.count}"), source=source)
        ready = trio.Event()
        nursery.start_soon(peer.run, lambda _: ready.set())
        await ready.wait()
        with trio.fail_after(60):
            while len(peer.connected_peers()) < len(self.victims):
                await trio.sleep(0.1)
        await trio.sleep(1.5)  # join the gossip mesh
        return peer

    async def sample(self, phase: str) -> None:
        """Victims' memory and /health latency, until cancelled."""
        while True:
            for victim in self.victims:
                self.memory[phase].append(resident_bytes(int(victim.info["pid"])))
            started = time.monotonic()
            await trio.to_thread.run_sync(self.victims[1].get, "/health")
            self.health[phase].append(time.monotonic() - started)
            await trio.sleep(0.1)

    async def phase(self, name: str, seconds: float, attack: Callable[[], Awaitable[None]] | None) -> dict[str, Any]:
        start = await trio.to_thread.run_sync(self.height)
        started = time.monotonic()
        with trio.move_on_after(seconds):
            if attack is None:
                await trio.sleep_forever()
            await attack()
        end = await trio.to_thread.run_sync(self.height)
        minutes = (time.monotonic() - started) / 60
        result = {"heights": end - start, "per_minute": round((end - start) / minutes, 2)}
        print(f"[hostile] {name}: {result}", file=sys.stderr, flush=True)
        return result


async def run(args: argparse.Namespace, directory: Path, victims: list[NodeProcess]) -> dict[str, Any]:
    bench = Bench(directory, victims, args.identities)
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        bench.tracker = await bench.identity(nursery, follow=True)

        async def withheld(peer: HostilePeer, sent: int) -> None:
            await peer.announce_withheld()

        async def invalid(peer: HostilePeer, sent: int) -> None:
            await peer.announce_unevaluated(seed=1000 * bench.count + sent)

        async def flood(peer: HostilePeer, sent: int) -> None:
            for victim in peer.connected_peers():
                await peer.flood_sync(victim, 64, Request("decided", (1, 32)))

        async with trio.open_nursery() as sampler:
            sampler.start_soon(bench.sample, "baseline")
            results["baseline"] = await bench.phase("baseline", args.seconds, None)
            sampler.cancel_scope.cancel()
        bans_seen: dict[str, list[tuple[int, int]]] = {}
        for name, act, pause in (("withheld", withheld, 0.5), ("invalid", invalid, 0.5), ("sync-flood", flood, 0.1)):
            recorder: list[tuple[int, int]] = []

            async def go(act: Callable[[HostilePeer, int], Awaitable[None]] = act, pause: float = pause,
                         recorder: list[tuple[int, int]] = recorder) -> None:  # fmt: skip
                await attack_recording(bench, nursery, act, pause, recorder)

            results[name] = await bench.phase(name, args.seconds, go)
            bans_seen[name] = recorder
        async with trio.open_nursery() as sampler:
            sampler.start_soon(bench.sample, "baseline")
            results["baseline-again"] = await bench.phase("baseline-again", args.seconds, None)
            sampler.cancel_scope.cancel()
        bomb = decode_bomb(16 << 20)
        bomb_bans: list[int] = []

        async def bombing() -> None:
            while True:
                peer = await bench.identity(nursery)
                peer.bomb = bomb
                while await trio.to_thread.run_sync(bench.banned_by, peer.peer_id) is None:
                    await trio.sleep(0.5)
                bomb_bans.append(peer.bombs_served)
                peer.stop()

        async with trio.open_nursery() as sampler:
            sampler.start_soon(bench.sample, "bomb")
            results["bomb"] = await bench.phase("bomb", args.seconds, bombing)
            sampler.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    baseline = (results["baseline"]["per_minute"] + results["baseline-again"]["per_minute"]) / 2
    for name in ("withheld", "invalid", "sync-flood", "bomb"):
        results[name]["ratio"] = round(results[name]["per_minute"] / baseline, 2) if baseline else None
    for name, recorder in bans_seen.items():
        results[name]["banned"] = len(recorder)
        results[name]["most_messages_before_ban"] = max(sent for sent, _ in recorder) if recorder else None
        results[name]["most_penalties_before_ban"] = max(taken for _, taken in recorder) if recorder else None
    results["bomb"]["banned"] = len(bomb_bans)
    results["bomb"]["answers_before_ban"] = max(bomb_bans) if bomb_bans else None
    memory_baseline = statistics.median(bench.memory["baseline"])
    results["bomb"]["memory_peak_over_baseline"] = round(max(bench.memory["bomb"]) / memory_baseline, 2)
    results["bomb"]["slowest_health_seconds"] = round(max(bench.health["bomb"]), 3)
    results["baseline"]["slowest_health_seconds"] = round(max(bench.health["baseline"]), 3)
    for store in bench.stores:
        store.close()
    return results


async def attack_recording(
    bench: Bench,
    nursery: trio.Nursery,
    act: Callable[[HostilePeer, int], Awaitable[None]],
    pause: float,
    recorder: list[tuple[int, int]],
) -> None:
    """`identities` attackers at once; each banned one's (messages sent, penalties taken)
    goes into `recorder`."""

    async def one_attacker() -> None:
        while True:
            peer = await bench.identity(nursery)
            sent = 0
            try:
                while True:
                    await act(peer, sent)
                    sent += 1
                    await trio.sleep(pause)
                    if sent % 2 == 0:
                        penalties = await trio.to_thread.run_sync(bench.banned_by, peer.peer_id)
                        if penalties is not None:
                            recorder.append((sent, penalties))
                            break
            finally:
                peer.stop()

    async with trio.open_nursery() as attackers:
        for _ in range(bench.identities):
            attackers.start_soon(one_attacker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each phase")
    parser.add_argument("--identities", type=int, default=4, help="attackers at once in each attack")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="hostile-peers-"))
    victims = start_network(directory)
    os.nice(10)  # the attackers run here, but would run elsewhere: the victims' processes come first
    logging.basicConfig(level=logging.WARNING)
    try:
        wait_finalized(victims, 3, timeout=300)
        results = trio.run(run, args, directory, victims)
    finally:
        codes = stop_all(victims)
    results["victims_exit_codes"] = codes
    results["seconds_per_phase"] = args.seconds
    results["identities"] = args.identities
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
