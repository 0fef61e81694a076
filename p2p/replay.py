"""Re-validating a stored decided chain from genesis into a fresh state (`potchain replay`).

Each decided block of the canonical chain is checked as a node checks one it
imports (p2p/decided_node.py, consensus/decided_chain.py), cheapest first:
it is the block the canonical index names at its height; its stored commit
certificate is for it and valid for the validators of the state before it
(`consensus.voting.validate_commit`); and it is valid on its parent with the
training blocks it names (`consensus.decisions.apply_decided_block`, which
re-runs every evaluation). Anything else is a `CorruptStore` naming the
height: a decided store holds only blocks that passed these checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chain.blocks import Block, DecidedBody, Kind
from chain.encoding import DecodeError
from chain.state import State
from chain.store import ChainDB, CorruptStore
from consensus.decisions import apply_decided_block, get_validator_set
from consensus.rules import Chain, InvalidBlock
from consensus.voting import InvalidVote, ValidatorSet, validate_commit


@dataclass(frozen=True)
class Replayed:
    """The outcome of a replay."""

    head: Block
    """The last block of the canonical chain."""
    state: State
    """The state after it, computed from genesis."""
    decided_blocks: int
    """Decided blocks re-applied."""
    training_blocks: int
    """Training blocks they name, re-validated with them."""


def replay_decided_chain(
    db: ChainDB,
    chain: Chain,
    genesis: Block,
    genesis_state: State,
    on_block: Callable[[Block], None] | None = None,
) -> Replayed:
    """Re-apply the canonical chain of `db` from `genesis` (see the module docstring);
    `on_block` is called with each decided block once it is re-applied (to report progress)."""
    parent, state = genesis, genesis_state
    previous_validators: ValidatorSet | None = None  # who voted on the parent's height (None: genesis)
    decided_blocks = training_blocks = 0
    height = 0
    try:
        for height, block in enumerate(db.canonical_blocks()):
            if block.hash != db.canonical_hash(height) or block.header.height != height:
                raise CorruptStore(f"the block stored for height {height} is another block ({block.hash.hex()})")
            if height == 0:
                if block.hash != genesis.hash:
                    raise CorruptStore(f"stored genesis block {block.hash.hex()} is not this genesis's")
                continue
            validators = get_validator_set(state, chain.genesis)
            named = read_decided_block(db, block, validators, chain)
            try:
                state = apply_decided_block(state, parent, block, named, previous_validators, chain)
            except InvalidBlock as error:
                raise CorruptStore(f"the decided block at height {height} is invalid: {error}") from None
            parent, previous_validators = block, validators
            decided_blocks += 1
            training_blocks += len(named)
            if on_block is not None:
                on_block(block)
    except (KeyError, DecodeError) as error:
        raise CorruptStore(f"the stored chain at height {height} does not read back: {error}") from None
    return Replayed(parent, state, decided_blocks, training_blocks)


def read_decided_block(db: ChainDB, block: Block, validators: ValidatorSet, chain: Chain) -> dict[bytes, Block]:
    """Check a stored decided block's kind and commit certificate (`validators`: those who
    voted on its height); return the training blocks it names, read from the store."""
    height, body = block.header.height, block.body
    if block.header.kind != Kind.DECIDED or not isinstance(body, DecidedBody):
        raise CorruptStore(
            f"the block at height {height} is a {block.header.kind.name.lower()} block, not a decided one"
        )
    commit = db.commit(block.hash)
    if commit is None:
        raise CorruptStore(f"the decided block at height {height} has no commit certificate")
    if (commit.height, commit.block_hash) != (height, block.hash):
        raise CorruptStore(
            f"the commit certificate stored for height {height} is for height {commit.height} "
            f"block {commit.block_hash.hex()}"
        )
    try:
        validate_commit(commit, validators, chain.domain)
    except InvalidVote as error:
        raise CorruptStore(f"the commit certificate of height {height} is invalid: {error}") from None
    named: dict[bytes, Block] = {}
    for verdict in body.training:
        if not db.has_block(verdict.training_block):
            name = verdict.training_block.hex()
            raise CorruptStore(f"the decided block at height {height} names training block {name}, not stored")
        named[verdict.training_block] = db.block(verdict.training_block)
    return named
