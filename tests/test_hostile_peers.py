"""Hostile peers against real voting nodes over real libp2p (loopback TCP).

Two honest nodes, two validators each, decide heights; peers without stake
(sim/adversaries/hostile.py) attack the first. For each attack: the
attacker is banned within a stated number of messages, the victim's work
stays inside its budgets, and both honest nodes go on deciding. The
finality rate under attack against the same network without it is measured
by bench/hostile_peers.py (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from chain.crypto import devnet_key
from consensus.voting import TimeoutParameters
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.peers import NEWCOMER_BURST, NEWCOMER_RATE, REQUEST_BURST, REQUEST_RATE
from p2p.voting_node import VotingNode, VotingNodeConfig, votes_topic
from p2p.wire import Request, block_topic
from sim.adversaries.hostile import MALFORMED_GOSSIP, HostilePeer, decode_bomb
from tests.chain_builders import Scenario

Attack = Callable[[list[HostilePeer], VotingNode, VotingNode], Awaitable[None]]


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def address_of(node: VotingNode) -> str:
    return f"{node.listen_addresses[0]}/p2p/{node.peer_id}"


def run_attack(tmp_path: Path, attack: Attack, attackers: int = 1, heights_after: int = 2) -> None:
    """Start the honest pair, let `attackers` hostile peers connect to the first node, run the
    attack, then require both honest nodes to decide `heights_after` more heights."""
    scenario = Scenario.create(tmp_path / "builder")
    keys = scenario.validators
    stores = [DecidedNode(DEVNET, tmp_path / f"honest{i}") for i in range(2)]
    hostile_stores = [DecidedNode(DEVNET, tmp_path / f"hostile{i}") for i in range(attackers)]
    timeouts = TimeoutParameters(4000, 1000, 1000, 500)

    async def start(nursery: trio.Nursery, node: VotingNode) -> None:
        ready = trio.Event()
        nursery.start_soon(node.run, lambda _: ready.set())
        await ready.wait()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = VotingNode(stores[0], VotingNodeConfig(validator_keys=keys[:2], timeouts=timeouts,
                                                       proposal_wait_seconds=0.5))  # fmt: skip
            await start(nursery, a)
            b = VotingNode(stores[1], VotingNodeConfig(bootstrap=[address_of(a)], validator_keys=keys[2:],
                                                       timeouts=timeouts, proposal_wait_seconds=0.5))  # fmt: skip
            await start(nursery, b)
            hostile = [
                HostilePeer(store, VotingNodeConfig(bootstrap=[address_of(a)]), devnet_key(f"hostile-{i}"))
                for i, store in enumerate(hostile_stores)
            ]
            for peer in hostile:
                await start(nursery, peer)
            with trio.fail_after(120):
                while a.voting.height < 2 or any(not peer.connected_peers() for peer in hostile):
                    await trio.sleep(0.2)
                while any(peer.node.head().block.hash != a.node.head().block.hash for peer in hostile):
                    await trio.sleep(0.1)  # the attackers know the head they attack on
            await trio.sleep(1.5)  # gossip meshes form
            with trio.fail_after(240):
                await attack(hostile, a, b)
            target = max(a.voting.height, b.voting.height) + heights_after
            with trio.fail_after(180):
                while min(a.voting.height, b.voting.height) < target:
                    await trio.sleep(0.2)
            assert a.failure is None and b.failure is None
            for node in (a, b, *hostile):
                node.stop()

    try:
        trio.run(main)
    finally:
        for store in [*stores, *hostile_stores]:
            store.close()
        scenario.node.close()


def rejections_of(victim: VotingNode, attacker: HostilePeer, what: str) -> int:
    return sum(1 for r in victim.rejections if r.peer_id == attacker.peer_id and what in r.what)


async def wait_banned(victim: VotingNode, attacker: HostilePeer, seconds: float = 30) -> None:
    with trio.fail_after(seconds):
        while not victim.peers.is_banned(attacker.peer_id):
            await trio.sleep(0.1)


def test_an_announcer_that_withholds_bodies_is_banned_after_four(tmp_path: Path) -> None:
    async def attack(hostile: list[HostilePeer], a: VotingNode, b: VotingNode) -> None:
        attacker = hostile[0]
        sent = 0
        with trio.fail_after(60):
            while not a.peers.is_banned(attacker.peer_id):
                await attacker.announce_withheld()
                sent += 1
                await trio.sleep(0.3)
        # Each withheld body costs 25 of the 100 points: the fourth the victim fetched bans it
        # (announcements over the verification budget are dropped unread, at no cost to anyone).
        assert rejections_of(a, attacker, "block announcement") == 4, [r.reason for r in a.rejections]
        height = a.voting.height
        for _ in range(5):  # once banned, its gossip is dropped before it is read
            await attacker.announce_withheld()
        await trio.sleep(1)
        assert rejections_of(a, attacker, "block announcement") == 4
        assert a.voting.height >= height

    run_attack(tmp_path, attack)


def test_invalid_training_blocks_from_fresh_identities_cost_at_most_the_newcomer_budget(tmp_path: Path) -> None:
    started = 0.0

    async def attack(hostile: list[HostilePeer], a: VotingNode, b: VotingNode) -> None:
        nonlocal started
        started = time.monotonic()
        for round_number in range(2):
            for index, attacker in enumerate(hostile):
                for attempt in range(20):  # forging takes an evaluation: the head may move meanwhile
                    while attacker.node.head().block.hash != a.node.head().block.hash:
                        await trio.sleep(0.1)
                    block = await attacker.forge_invalid(seed=1000 * round_number + 10 * index + attempt)
                    if block.header.parent == a.node.head().block.hash:
                        await attacker.announce_forged(block)
                        break
        await trio.sleep(3)
        elapsed = time.monotonic() - started
        evaluated = sum(rejections_of(a, attacker, "training block") for attacker in hostile)
        # Every identity is a newcomer: together they get the newcomers' budget, no more.
        assert 1 <= evaluated <= NEWCOMER_BURST + NEWCOMER_RATE * elapsed + 1, (evaluated, elapsed)
        for attacker in hostile:  # two false blocks ban an identity (50 points each)
            if rejections_of(a, attacker, "training block") >= 2:
                assert a.peers.is_banned(attacker.peer_id)

    run_attack(tmp_path, attack, attackers=4)


def test_a_decode_bomb_in_a_sync_answer_is_refused_without_the_memory_and_bans_its_sender(tmp_path: Path) -> None:
    async def attack(hostile: list[HostilePeer], a: VotingNode, b: VotingNode) -> None:
        attacker = hostile[0]
        bomb = decode_bomb(16 << 20)  # 16 MiB: about 1 GB as Python lists
        baseline, peak = rss_bytes(), 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_bytes())
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            attacker.bomb = bomb
            await wait_banned(a, attacker, 60)
            nursery.cancel_scope.cancel()
        assert attacker.bombs_served <= 2 + 2  # two ban it at `a` (50 points each); `b` may ask too
        assert peak - baseline < 200 << 20, (baseline >> 20, peak >> 20)
        attacker.bomb = None

    run_attack(tmp_path, attack)


def test_a_peer_flooding_sync_requests_is_answered_busy_then_banned(tmp_path: Path) -> None:
    async def attack(hostile: list[HostilePeer], a: VotingNode, b: VotingNode) -> None:
        attacker = hostile[0]
        victim = attacker.connected_peers()[0]
        started = time.monotonic()
        outcomes = await attacker.flood_sync(victim, 400, Request("decided", (1, 32)))
        elapsed = time.monotonic() - started
        assert outcomes["ok"] <= REQUEST_BURST + REQUEST_RATE * elapsed + 8, (outcomes, elapsed)
        assert outcomes["busy"] >= 1, outcomes
        await wait_banned(a, attacker)  # 5 points per request over budget: the 20th bans it

    run_attack(tmp_path, attack)


@pytest.mark.parametrize("topic", ["votes", "blocks"])
def test_malformed_and_oversized_gossip_bans_its_sender_after_five(tmp_path: Path, topic: str) -> None:
    async def attack(hostile: list[HostilePeer], a: VotingNode, b: VotingNode) -> None:
        attacker = hostile[0]
        name = votes_topic(a.chain_id) if topic == "votes" else block_topic(a.chain_id)
        for payload in MALFORMED_GOSSIP:
            await attacker.publish_raw(name, payload)
        await wait_banned(a, attacker)
        refused = [r for r in a.rejections if r.peer_id == attacker.peer_id]
        assert len(refused) == 5, [r.reason for r in refused]  # 20 points each
        assert any("limit" in r.reason for r in refused)  # the oversized one, by its size

    run_attack(tmp_path, attack)


def test_an_oversized_sync_frame_costs_its_sender(tmp_path: Path) -> None:
    async def attack(hostile: list[HostilePeer], a: VotingNode, b: VotingNode) -> None:
        attacker = hostile[0]
        victim = attacker.connected_peers()[0]
        for _ in range(5):
            await attacker.send_oversized_frame(victim)
        await wait_banned(a, attacker)
        assert all("frame length" in r.reason for r in a.rejections if r.peer_id == attacker.peer_id)

    run_attack(tmp_path, attack)
