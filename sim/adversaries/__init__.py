"""Adversarial nodes for the simulation: real libp2p voting nodes that break the rules on purpose.

Each adversary is a `VotingNode` with one behaviour changed or added, in a
module of its own, so what it sends goes over the same gossip and sync
protocols as an honest node's. `potchain node --adversary KIND` runs one
(simulations only).
"""

from __future__ import annotations

from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNode, VotingNodeConfig
from sim.adversaries.base import Adversary, forge_training_block
from sim.adversaries.colluder import Colluder
from sim.adversaries.copier import Copier, PerturbingCopier
from sim.adversaries.equivocator import Equivocator
from sim.adversaries.false_claims import FalseClaims
from sim.adversaries.overfitter import Overfitter
from sim.adversaries.public_data import PublicDataMiner
from sim.adversaries.variant_spammer import VariantSpammer
from sim.adversaries.withholder import Withholder

ADVERSARY_CLASSES: dict[str, type[Adversary]] = {
    cls.kind: cls
    for cls in (
        Equivocator, VariantSpammer, FalseClaims, Withholder,
        Overfitter, PublicDataMiner, Copier, PerturbingCopier, Colluder,
    )
}  # fmt: skip

__all__ = ["ADVERSARY_CLASSES", "Adversary", "forge_training_block", "make_adversary"]


def make_adversary(kind: str, node: DecidedNode, config: VotingNodeConfig) -> VotingNode:
    """The node for an adversary kind (sim/scenario.py ADVERSARIES)."""
    if kind not in ADVERSARY_CLASSES:
        raise ValueError(f"unknown adversary {kind!r}; known: {', '.join(sorted(ADVERSARY_CLASSES))}")
    return ADVERSARY_CLASSES[kind](node, config)
