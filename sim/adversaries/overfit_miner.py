"""A miner that trains on the validation batch: it overfits to the proof.

Its blocks are valid (the validation gain is real, and large), which is why
the chain does not trust the validation split alone: the validators evaluate
every update on test batches the miner could not know, and an update that
only fits the validation batch shows no gain there and is rejected out of
sample (the model keeps its weights).
"""

from __future__ import annotations

from chain.blocks import Block
from consensus.rules import compute_validation_seed
from sim.adversaries.base import Adversary
from training.data import sample_batch


class OverfitMiner(Adversary):
    kind = "overfit-miner"

    def training_text(self, parent: Block, train_text: bytes) -> bytes:
        genesis = self.node.genesis
        inputs, targets = sample_batch(
            self.node.chain.validation_text, compute_validation_seed(parent.hash),
            genesis.evaluation.validation_sequences, genesis.model.context,
        )  # fmt: skip
        rows = [bytes(row.tolist()) + bytes([int(target[-1])]) for row, target in zip(inputs, targets, strict=True)]
        return b"".join(rows)

    async def announce_mined(self, block: Block) -> None:
        self.record("mined on the validation batch itself", block=block.hash.hex(), invalid=False,
                    expect="rejected out of sample")  # fmt: skip
        await super().announce_mined(block)
