"""Fork choice: a `Store` of valid blocks, event handlers and `get_head`.

`on_block` and `on_attestation` validate first and change the store only
when the input is valid; an invalid call raises `InvalidBlock` and leaves the
store exactly as it was.

Finality: a validation block carries a 2/3-stake quorum, so importing one
finalizes its training block. That training block becomes the store's
anchor (`finalized`): every block must descend from it, and branches that do
not are pruned. Two validators may both propose a validation block for it
(the second one's turn came before the first one's block reached it); both
decide the same training block, so they compete under the fork choice like
any siblings, and the next validation block, built on one of them, settles
which. New training blocks build on the *checkpoint* (`get_checkpoint`): the
head chain's validation block of the anchor, or genesis.

The head (`get_head`) is found by walking down from the anchor, at each
block taking the child whose subtree holds the most cumulative confirmed
improvement; among validation blocks the tie goes to the lowest hash (every
node picks the same one at once, whatever order they arrived in), among
training blocks to the one seen first, then the lowest hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chain.blocks import Attestation, Block, Evidence, Kind, TrainingBody, ValidationBody
from chain.state import State
from consensus.rules import (
    Chain,
    InvalidBlock,
    StaleBlock,
    UnknownParent,
    apply_block,
    is_confirmed,
    validate_attestation,
    validate_evidence,
)


@dataclass
class Node:
    """A valid block and what the store knows of it."""

    block: Block
    """The block."""
    state: State
    """The state after it."""
    confirmed_gain: int
    """Sum of the validation gains of the finalized training blocks up to it."""
    seen: int
    """Arrival order (first seen is lowest)."""


@dataclass(frozen=True)
class HeadChange:
    """How the canonical chain moved; a reorg has a non-empty old_canonical."""

    old_head: bytes
    new_head: bytes
    new_canonical: tuple[tuple[int, bytes], ...]
    """(height, hash) of blocks that joined the canonical chain, oldest first."""
    old_canonical: tuple[tuple[int, bytes], ...]
    """(height, hash) of blocks that left it, oldest first."""


@dataclass
class Store:
    """Fork-choice store, anchored at a finalized block."""

    chain: Chain
    nodes: dict[bytes, Node]
    finalized: bytes
    """The anchor: genesis or the last finalized (decided) training block."""
    head: bytes
    time: int = 0
    """The node's clock (Unix seconds), for the future-timestamp rule."""
    attestations: dict[bytes, dict[bytes, Attestation]] = field(default_factory=dict)
    """Valid attestations by training block, then by validator."""
    evidence: dict[bytes, Evidence] = field(default_factory=dict)
    """Equivocations seen, by offender, not yet included in a block."""
    _seen: int = 0

    @classmethod
    def from_anchor(cls, chain: Chain, anchor: Block, state: State, confirmed_gain: int = 0) -> Store:
        node = Node(anchor, state, confirmed_gain, 0)
        return cls(chain=chain, nodes={anchor.hash: node}, finalized=anchor.hash, head=anchor.hash)

    # --- queries ------------------------------------------------------------

    def get_head(self) -> bytes:
        """Walk down from the anchor: at each block, the child with the most
        confirmed gain in its subtree; ties among validation blocks go to the
        lowest hash, among training blocks to the first seen, then the lowest hash."""
        children: dict[bytes, list[Node]] = {}
        for node in self.nodes.values():
            children.setdefault(node.block.header.parent, []).append(node)
        best_gain: dict[bytes, int] = {}

        def subtree_gain(node: Node) -> int:
            if node.block.hash not in best_gain:
                below = [subtree_gain(child) for child in children.get(node.block.hash, [])]
                best_gain[node.block.hash] = max([node.confirmed_gain, *below])
            return best_gain[node.block.hash]

        def preference(node: Node) -> tuple[int, int, bytes]:
            seen = 0 if node.block.header.kind == Kind.VALIDATION else node.seen
            return (-subtree_gain(node), seen, node.block.hash)

        current = self.nodes[self.finalized]
        while children.get(current.block.hash):
            current = min(children[current.block.hash], key=preference)
        return current.block.hash

    def get_checkpoint(self) -> bytes:
        """The block new training blocks build on: the anchor if it is genesis,
        else the validation block of the anchor on the head's chain."""
        anchor = self.nodes[self.finalized]
        if anchor.block.header.kind == Kind.GENESIS:
            return anchor.block.hash
        node = self.nodes[self.head]
        while node.block.header.height > anchor.block.header.height + 1:
            node = self.nodes[node.block.header.parent]
        return node.block.hash

    def is_descendant(self, block_hash: bytes, ancestor: bytes) -> bool:
        node = self.nodes.get(block_hash)
        stop = self.nodes[ancestor].block.header.height
        while node is not None and node.block.header.height > stop:
            node = self.nodes.get(node.block.header.parent)
        return node is not None and node.block.hash == ancestor

    def pending_training_blocks(self) -> list[Block]:
        """Training blocks on the checkpoint, awaiting validation (first seen first)."""
        checkpoint = self.get_checkpoint()
        return [
            node.block
            for node in sorted(self.nodes.values(), key=lambda n: n.seen)
            if node.block.header.kind == Kind.TRAINING and node.block.header.parent == checkpoint
        ]

    def path(self, block_hash: bytes) -> list[tuple[int, bytes]]:
        """(height, hash) from the anchor's child up to `block_hash`, oldest first."""
        steps = []
        anchor = self._anchor()
        node = self.nodes.get(block_hash)
        while node is not None and node.block.hash != anchor:
            steps.append((node.block.header.height, node.block.hash))
            node = self.nodes.get(node.block.header.parent)
        return steps[::-1]

    def _anchor(self) -> bytes:
        return min(self.nodes.values(), key=lambda node: node.block.header.height).block.hash

    # --- events -------------------------------------------------------------

    def on_tick(self, time: int) -> None:
        self.time = max(self.time, time)

    def on_block(self, block: Block) -> HeadChange:
        """Validate and add a block; returns how the head moved."""
        if block.hash in self.nodes:
            return HeadChange(self.head, self.head, (), ())
        finalized_height = self.nodes[self.finalized].block.header.height
        if block.header.height <= finalized_height:
            raise StaleBlock(
                f"height: {block.header.height} conflicts with the finalized block at height {finalized_height}"
            )
        parent = self.nodes.get(block.header.parent)
        if parent is None:
            raise UnknownParent(f"parent: unknown block {block.header.parent.hex()}")
        limit = self.time + self.chain.genesis.consensus.max_future_seconds
        if block.header.timestamp > limit:
            raise InvalidBlock(f"timestamp: {block.header.timestamp} is in the future (limit {limit})")
        if not self.is_descendant(parent.block.hash, self.finalized):
            raise StaleBlock(f"parent: conflicts with the finalized block at height {finalized_height}")
        state = apply_block(parent.state, parent.block, block, self.chain)

        gain = parent.confirmed_gain
        if (
            isinstance(block.body, ValidationBody)
            and is_confirmed(block.body)
            and isinstance(parent.block.body, TrainingBody)
        ):
            gain += parent.block.body.loss_before - parent.block.body.loss_after
        self._seen += 1
        self.nodes[block.hash] = Node(block, state, gain, self._seen)
        if block.header.kind != Kind.VALIDATION or block.header.parent == self.finalized:
            return self._update_head()
        self.finalized = block.header.parent
        change = self._update_head()
        self._prune()
        return change

    def on_attestation(self, attestation: Attestation) -> Evidence | None:
        """Keep a valid attestation of a pending training block; returns the
        evidence when it conflicts with one the same validator gave before.

        The conflicting attestation is kept too: it is a valid evaluation, and
        dropping it could leave the block it attests one stake short of a
        quorum, so that no validation block (the one that slashes the
        equivocator) could ever be built. Counting it cannot finalize two
        blocks unless >= 1/3 of stake equivocates, which the evidence punishes."""
        node = self.nodes.get(attestation.training_block)
        if node is None or node.block.header.kind != Kind.TRAINING:
            raise InvalidBlock(f"attestation: unknown training block {attestation.training_block.hex()}")
        parent = self.nodes[node.block.header.parent]
        body = node.block.body
        assert isinstance(body, TrainingBody)
        updated = parent.state.with_slice(body.slice_id, body.weights)
        validate_attestation(parent.state, attestation, node.block, updated, self.chain)
        for other_block, by_validator in self.attestations.items():
            other = by_validator.get(attestation.validator)
            if other is not None and other_block != attestation.training_block and other.parent == attestation.parent:
                validate_evidence(parent.state, other, attestation, self.chain)
                evidence = Evidence(other, attestation)
                self.evidence.setdefault(attestation.validator, evidence)
                self.attestations.setdefault(attestation.training_block, {})[attestation.validator] = attestation
                return evidence
        self.attestations.setdefault(attestation.training_block, {})[attestation.validator] = attestation
        return None

    # --- internals ----------------------------------------------------------

    def _prune(self) -> None:
        """Keep only the finalized checkpoint and its descendants: it becomes the anchor."""
        self.nodes = {h: n for h, n in self.nodes.items() if self.is_descendant(h, self.finalized)}
        self.attestations = {h: a for h, a in self.attestations.items() if h in self.nodes}

    def _update_head(self) -> HeadChange:
        old, new = self.head, self.get_head()
        self.head = new
        old_path, new_path = self.path(old), self.path(new)
        common = 0
        while common < min(len(old_path), len(new_path)) and old_path[common] == new_path[common]:
            common += 1
        return HeadChange(old, new, tuple(new_path[common:]), tuple(old_path[common:]))
