"""Adversarial nodes for the simulation: real libp2p nodes that break the rules on purpose.

Each adversary is a `NetworkNode` with one behaviour changed, in a module of
its own, so what it sends goes over the same gossip and sync protocols as an
honest node's. `potchain node --adversary KIND` runs one (simulations only).
"""

from __future__ import annotations

from p2p.full_node import FullNode
from p2p.service import NetworkNode, NodeConfig
from sim.adversaries.base import Adversary, forge_training_block
from sim.adversaries.equivocator import Equivocator
from sim.adversaries.false_attester import FalseAttester
from sim.adversaries.false_claims import FalseClaims
from sim.adversaries.overfit_miner import OverfitMiner
from sim.adversaries.replay_miner import ReplayMiner
from sim.adversaries.spammer import Spammer
from sim.adversaries.withholder import Withholder

ADVERSARY_CLASSES: dict[str, type[Adversary]] = {
    cls.kind: cls for cls in (FalseClaims, Spammer, OverfitMiner, ReplayMiner, FalseAttester, Equivocator, Withholder)
}

__all__ = ["ADVERSARY_CLASSES", "Adversary", "forge_training_block", "make_adversary"]


def make_adversary(kind: str, node: FullNode, config: NodeConfig) -> NetworkNode:
    """The node for an adversary kind (sim/scenario.py ADVERSARIES)."""
    if kind not in ADVERSARY_CLASSES:
        raise ValueError(f"unknown adversary {kind!r}; known: {', '.join(sorted(ADVERSARY_CLASSES))}")
    return ADVERSARY_CLASSES[kind](node, config)
