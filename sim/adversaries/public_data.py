"""A miner that trains on every public byte: the train, validation and test splits, and every
held-out sequence a decided block has revealed so far.

Revealed sequences never judge again (the state marks them), so training on
them is honest training on more data (docs/spec.md, section 17.4). On a
development network the held-out shards are INSECURE: they are dealt from
the public test split (`genesis.devnet_shard`), so this miner has trained on
every validator's unrevealed sequences too, as a miner colluding with every
validator would; on a network whose validators hold private shards it
cannot have. It commits and reveals like an honest miner
(sim/adversaries/committing.py).
"""

from __future__ import annotations

from chain.blocks import Block, DecidedBody
from genesis import chunk_directory
from sim.adversaries.committing import CommittingMiner
from training.data import load_split


def revealed_sequences(block: Block) -> list[bytes]:
    """The held-out sequences a decided block reveals (none for another block)."""
    body = block.body
    if not isinstance(body, DecidedBody) or body.test is None:
        return []
    return [revealed.sequence for revealed in body.test.sequences]


class PublicDataMiner(CommittingMiner):
    kind = "public-data"

    def training_text(self) -> bytes:
        genesis = self.node.genesis
        directory = chunk_directory(self.node.genesis_path, genesis)
        self.public = b"".join(
            load_split(genesis.dataset, directory, split) for split in ("train", "validation", "test")
        )
        self.revealed: list[bytes] = []
        self.seen_height = 0
        return self.refreshed_text(self.node.head().block) or self.public

    def refreshed_text(self, head: Block) -> bytes | None:
        """The public text and every sequence revealed up to `head` (read from the store once each)."""
        if head.header.height <= self.seen_height:
            return None
        for height in range(self.seen_height + 1, head.header.height + 1):
            block = head if height == head.header.height else self.node.block_at(height)
            if block is not None:
                self.revealed.extend(revealed_sequences(block))
        self.seen_height = head.header.height
        return self.public + b"".join(self.revealed)
