"""Height time and canonical evaluations per height on the voting node, devnet model.

    python bench/voting_rounds.py [--heights 8] [--validators 4] [--no-miner]

Runs `--validators` voting nodes (p2p/voting_node.py) on real libp2p hosts
over loopback in one process (they share this machine's cores, as a devnet's
processes do), one of them mining, until every node decided `--heights`
heights past a warm-up height. Prints one JSON line: the time per height
(median, max), the voting rounds each height took, the heights that named a
confirmed update, and each node's canonical evaluations per height (its
`Chain.evaluations` over the measured heights). The baseline in the same run
is one canonical evaluation's time on this machine, so `height_over_evaluation`
says how many evaluations' worth of time a height takes end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from chain.blocks import DecidedBody
from chain.crypto import devnet_key
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNode, VotingNodeConfig
from training.data import seed_from_int
from training.miner import TrainingConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heights", type=int, default=8)
    parser.add_argument("--validators", type=int, default=4)
    parser.add_argument("--no-miner", action="store_true")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="voting-rounds-"))
    stores = [DecidedNode(DEVNET, directory / f"node{i}") for i in range(args.validators)]
    state = stores[0].head().state
    stores[0].chain.loss(state, "validation", seed_from_int(1))  # the tables, outside the timing
    started = time.perf_counter()
    stores[0].chain.forget_losses()
    stores[0].chain.loss(state, "validation", seed_from_int(2))
    evaluation_seconds = time.perf_counter() - started
    nodes: list[VotingNode] = []
    decided_at: dict[int, float] = {}
    evaluations_at_start: list[int] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(args.validators):
                bootstrap = [f"{nodes[0].listen_addresses[0]}/p2p/{nodes[0].peer_id}"] if nodes else []
                miner = devnet_key("miner-0") if index == 0 and not args.no_miner else None
                config = VotingNodeConfig(
                    bootstrap=bootstrap, validator_keys=[devnet_key(f"validator-{index}")], miner_key=miner,
                    training=TrainingConfig(steps=30),
                )  # fmt: skip
                node = VotingNode(stores[index], config)
                ready = trio.Event()
                nursery.start_soon(node.run, lambda _, ready=ready: ready.set())
                await ready.wait()
                nodes.append(node)
            while min(n.voting.height for n in nodes) < 2:  # height 1 is the warm-up
                await trio.sleep(0.05)
            evaluations_at_start.extend(store.chain.evaluations for store in stores)
            decided_at[1] = time.perf_counter()
            while min(n.voting.height for n in nodes) <= 1 + args.heights:
                height = min(n.voting.height for n in nodes) - 1
                decided_at.setdefault(height, time.perf_counter())
                print(f"[bench] decided height {height}", file=sys.stderr, flush=True)
                await trio.sleep(0.05)
            decided_at.setdefault(1 + args.heights, time.perf_counter())
            for node in nodes:
                node.stop()

    trio.run(run)
    heights = range(2, 2 + args.heights)
    times = [decided_at[h] - decided_at[h - 1] for h in heights]
    blocks = [stores[0].block_at(h) for h in heights]
    commits = [stores[0].commit_of(b.hash) for b in blocks if b is not None]
    confirmed = sum(1 for b in blocks if b is not None and isinstance(b.body, DecidedBody) and b.body.applied)
    evaluations = [(s.chain.evaluations - e) / args.heights for s, e in zip(stores, evaluations_at_start, strict=True)]
    result = {
        "validators": args.validators,
        "heights": args.heights,
        "miner": not args.no_miner,
        "height_seconds": {"median": round(statistics.median(times), 3), "max": round(max(times), 3)},
        "voting_rounds": [c.round for c in commits if c is not None],
        "heights_with_confirmed_update": confirmed,
        "evaluations_per_height_per_node": [round(e, 2) for e in evaluations],
        "evaluation_seconds": round(evaluation_seconds, 4),
        "height_over_evaluation": round(statistics.median(times) / evaluation_seconds, 1),
    }
    for store in stores:
        store.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
