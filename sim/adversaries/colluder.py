"""A validator that gives its held-out shard to its own miner (a colluding miner on the same node).

The node votes and proposes honestly with its validator key; beside that it
mines with its own miner key on the validator's held-out shard (on a
development network the devnet shard, INSECURE and public anyway), and
commits and reveals like an honest miner (sim/adversaries/committing.py).
When the validator proposes, its block's held-out test is drawn from that
same shard, which the miner has fitted.

What the protocol bounds (docs/spec.md, section 17.4), and the report
shows per height (`colluder` in report.json):

- the colluder gains only at the heights its validator proposes: its stake
  share of the proposals; at every other proposer's height its update is
  tested on a shard it never saw;
- its update must still meet the difficulty on its validation batch, which
  did not exist when it committed (seeded by the parent and the miner);
- the sequences it fitted are revealed and spent as its validator judges
  with them: they never judge again.

The protocol cannot detect the collusion; it only bounds its reach.
"""

from __future__ import annotations

from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNodeConfig, validator_shards
from sim.adversaries.committing import CommittingMiner


class Colluder(CommittingMiner):
    kind = "colluder"

    def __init__(self, node: DecidedNode, config: VotingNodeConfig) -> None:
        super().__init__(node, config)
        shards = validator_shards(node, config)
        keys = [key for key in config.validator_keys if key.public_key in shards]
        if not keys:
            held = len(config.validator_keys)
            raise ValueError(f"colluder: needs a validator key with a held-out shard, got {held} key(s) without one")
        self.validator = keys[0].public_key
        """The colluding validator: its shard is what the miner trains on."""
        self.shard = shards[self.validator]

    def training_text(self) -> bytes:
        return b"".join(self.shard.sequences)
