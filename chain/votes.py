"""The voting messages of one height's BFT instance, and the commit certificate.

A **proposal** names the block a round's proposer puts forward (the block
itself travels as a block); **prevotes** and **precommits** name a block hash
or nil. A **commit** (certificate) is precommits for one block from at least
2/3 of stake in one round: it is what makes a block final, and it travels with
the block in sync and in the next block.

Each message is signed by its sender over its canonical encoding, in the
signature domain of section 6 of docs/spec.md, with a message type of its own,
so a prevote never passes for a precommit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from chain.crypto import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Domain, MessageType, PrivateKey, verify
from chain.encoding import DecodeError, Fields, pack, unpack

HASH_BYTES = 32
MAX_ROUND = 2**31 - 1
"""Rounds are counted from 0; a height that needs more than this never ends."""
MAX_COMMIT_SIGNATURES = 1024
"""Most precommits a commit certificate may carry (one per validator)."""
MAX_COMMIT_OBJECTS = 5 + 4 * MAX_COMMIT_SIGNATURES
"""Objects in a commit certificate's encoding at most: its array, four fields, and an
array of three fields per signature."""
MAX_MESSAGE_OBJECTS = 16
"""Objects in a vote's (8) or a proposal's (7) encoding, with room to spare."""


class VoteKind(IntEnum):
    """Which of a round's two votes."""

    PREVOTE = 1
    PRECOMMIT = 2


_VOTE_TYPES = {VoteKind.PREVOTE: MessageType.PREVOTE, VoteKind.PRECOMMIT: MessageType.PRECOMMIT}


@dataclass(frozen=True)
class Vote:
    """A validator's prevote or precommit in one round of one height."""

    kind: VoteKind
    """Prevote or precommit."""
    height: int
    """The height being decided."""
    round: int
    """The round, from 0."""
    block_hash: bytes | None
    """The block voted for; None is a vote for nil (no block this round). Encoded as empty bytes."""
    timestamp: int
    """The voter's clock (Unix seconds) when it voted; precommit timestamps give a decided block its time."""
    validator: bytes
    """The voter's public key."""
    signature: bytes = b""
    """The voter's signature over the fields above."""

    def unsigned_fields(self) -> list[Any]:
        block = b"" if self.block_hash is None else self.block_hash
        return [int(self.kind), self.height, self.round, block, self.timestamp, self.validator]

    def fields(self) -> list[Any]:
        return [*self.unsigned_fields(), self.signature]

    def encode(self) -> bytes:
        return pack(self.fields())

    def is_signed_by_validator(self, domain: Domain) -> bool:
        return verify(self.validator, self.signature, domain, _VOTE_TYPES[self.kind], pack(self.unsigned_fields()))

    @classmethod
    def from_fields(cls, value: Any) -> Vote:
        names = ("kind", "height", "round", "block_hash", "timestamp", "validator", "signature")
        f = Fields(value, "vote", names)
        block = f.binary("block_hash", max_length=HASH_BYTES)
        if len(block) not in (0, HASH_BYTES):
            raise DecodeError(f"vote.block_hash: {len(block)} bytes, want 0 (nil) or {HASH_BYTES}")
        return cls(
            kind=VoteKind(f.integer("kind", 1, 2)),
            height=f.integer("height", 1),
            round=f.integer("round", 0, MAX_ROUND),
            block_hash=block or None,
            timestamp=f.integer("timestamp", 0, 2**40),
            validator=f.binary("validator", PUBLIC_KEY_BYTES),
            signature=f.binary("signature", SIGNATURE_BYTES),
        )


def sign_vote(key: PrivateKey, domain: Domain, vote: Vote) -> Vote:
    """`vote` signed by `key` (vote.validator must be its public key)."""
    return replace(vote, signature=key.sign(domain, _VOTE_TYPES[vote.kind], pack(vote.unsigned_fields())))


def decode_vote(data: bytes) -> Vote:
    return Vote.from_fields(unpack(data, "vote", 1024, MAX_MESSAGE_OBJECTS))


@dataclass(frozen=True)
class Proposal:
    """A round's proposer putting a block forward."""

    height: int
    """The height being decided."""
    round: int
    """The round, from 0."""
    block_hash: bytes
    """The block proposed (fetched and checked by hash)."""
    valid_round: int
    """-1 for a new block; else the earlier round in which the proposer saw
    prevotes for this block from 2/3 of stake (Tendermint's valid-value rule)."""
    proposer: bytes
    """The proposer's public key; must be the round's proposer."""
    signature: bytes = b""
    """The proposer's signature over the fields above."""

    def unsigned_fields(self) -> list[Any]:
        return [self.height, self.round, self.block_hash, self.valid_round, self.proposer]

    def fields(self) -> list[Any]:
        return [*self.unsigned_fields(), self.signature]

    def encode(self) -> bytes:
        return pack(self.fields())

    def is_signed_by_proposer(self, domain: Domain) -> bool:
        return verify(self.proposer, self.signature, domain, MessageType.PROPOSAL, pack(self.unsigned_fields()))

    @classmethod
    def from_fields(cls, value: Any) -> Proposal:
        names = ("height", "round", "block_hash", "valid_round", "proposer", "signature")
        f = Fields(value, "proposal", names)
        proposal = cls(
            height=f.integer("height", 1),
            round=f.integer("round", 0, MAX_ROUND),
            block_hash=f.binary("block_hash", HASH_BYTES),
            valid_round=f.integer("valid_round", -1, MAX_ROUND),
            proposer=f.binary("proposer", PUBLIC_KEY_BYTES),
            signature=f.binary("signature", SIGNATURE_BYTES),
        )
        if proposal.valid_round >= proposal.round:
            raise DecodeError(f"proposal.valid_round: {proposal.valid_round} is not below the round {proposal.round}")
        return proposal


def sign_proposal(key: PrivateKey, domain: Domain, proposal: Proposal) -> Proposal:
    """`proposal` signed by `key` (proposal.proposer must be its public key)."""
    return replace(proposal, signature=key.sign(domain, MessageType.PROPOSAL, pack(proposal.unsigned_fields())))


def decode_proposal(data: bytes) -> Proposal:
    return Proposal.from_fields(unpack(data, "proposal", 1024, MAX_MESSAGE_OBJECTS))


@dataclass(frozen=True)
class Commit:
    """Precommits for one block from at least 2/3 of stake in one round: the block is decided."""

    height: int
    """The decided height."""
    round: int
    """The round in which it was decided."""
    block_hash: bytes
    """The decided block."""
    signatures: tuple[tuple[bytes, int, bytes], ...]
    """(validator, timestamp, signature) of each precommit, by validator."""

    def precommits(self) -> tuple[Vote, ...]:
        """The precommits the certificate carries, as votes."""
        return tuple(
            Vote(VoteKind.PRECOMMIT, self.height, self.round, self.block_hash, timestamp, validator, signature)
            for validator, timestamp, signature in self.signatures
        )

    def fields(self) -> list[Any]:
        return [self.height, self.round, self.block_hash, [list(s) for s in self.signatures]]

    def encode(self) -> bytes:
        return pack(self.fields())

    @classmethod
    def of(cls, precommits: list[Vote]) -> Commit:
        """A certificate from precommits for one block in one round (sorted by validator)."""
        first = precommits[0]
        assert first.block_hash is not None
        ordered = sorted(precommits, key=lambda vote: vote.validator)
        return cls(
            first.height, first.round, first.block_hash, tuple((v.validator, v.timestamp, v.signature) for v in ordered)
        )

    @classmethod
    def from_fields(cls, value: Any) -> Commit:
        f = Fields(value, "commit", ("height", "round", "block_hash", "signatures"))
        signatures = []
        for item in f.array("signatures", MAX_COMMIT_SIGNATURES):
            s = Fields(item, "commit signature", ("validator", "timestamp", "signature"))
            signatures.append(
                (s.binary("validator", PUBLIC_KEY_BYTES), s.integer("timestamp", 0, 2**40),
                 s.binary("signature", SIGNATURE_BYTES))
            )  # fmt: skip
        return cls(
            height=f.integer("height", 1),
            round=f.integer("round", 0, MAX_ROUND),
            block_hash=f.binary("block_hash", HASH_BYTES),
            signatures=tuple(signatures),
        )


def decode_commit(data: bytes) -> Commit:
    return Commit.from_fields(unpack(data, "commit", 1 << 20, MAX_COMMIT_OBJECTS))
