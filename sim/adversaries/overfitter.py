"""A miner that trains on the validation split, which every training block's validation batch comes from.

It commits and reveals like an honest miner (sim/adversaries/committing.py),
but its model fits the validation text: its updates gain much on their
validation batch and little, or nothing, on held-out text. The validation
gain only admits a training block (it must meet the difficulty); which
update is applied follows from the held-out test alone (docs/spec.md,
section 17.4), so the simulation reports how many of its updates were
applied at a height where an honest candidate was also tested
(`overfit_updates_decided`, target 0).
"""

from __future__ import annotations

from genesis import chunk_directory
from sim.adversaries.committing import CommittingMiner
from training.data import load_split


class Overfitter(CommittingMiner):
    kind = "overfitter"

    def training_text(self) -> bytes:
        genesis = self.node.genesis
        return load_split(genesis.dataset, chunk_directory(self.node.genesis_path, genesis), "validation")
