"""Blocks, attestations and evidence, with their canonical encodings and hashes.

A block is a header, a body and the proposer's signature. The header commits
to the body by `body_hash`; the block hash is the SHA-256 of the encoded
header. Training blocks carry a slice update and its loss-improvement claim;
validation blocks carry the attestations that confirm (or not) their parent
training block out of sample, slashing evidence, and the reward payout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from chain.crypto import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Domain, MessageType, PrivateKey, verify
from chain.encoding import MAX_MESSAGE_BYTES, Fields, pack, unpack
from chain.votes import Commit, Proposal, Vote
from chain.vrf import PROOF_BYTES as VRF_PROOF_BYTES

HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
MAX_WEIGHTS_BYTES = MAX_MESSAGE_BYTES - 4096
"""Largest slice update a training block may carry."""
MAX_LOSS = 2**62


class Kind(IntEnum):
    """What a block is; fixes its body type."""

    GENESIS = 0
    TRAINING = 1
    VALIDATION = 2
    """Wave 1: a validation block finalized by an attestation quorum (docs/spec.md, section 10)."""
    DECIDED = 3
    """Wave 2: the block one height's voting rounds decide (docs/spec.md, section 16)."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Header:
    """What every block commits to; its SHA-256 is the block hash."""

    chain_id: str
    """The network (genesis chain id)."""
    height: int
    """Parent's height + 1; genesis is 0."""
    parent: bytes
    """Parent block hash (zeros for genesis)."""
    kind: Kind
    """Genesis, training or validation."""
    timestamp: int
    """Unix seconds; strictly above the parent's."""
    proposer: bytes
    """Ed25519 public key of the miner (training) or validator (validation)."""
    state_root: bytes
    """State root after this block."""
    body_hash: bytes
    """SHA-256 of the encoded body."""

    def fields(self) -> list[Any]:
        return [
            self.chain_id, self.height, self.parent, int(self.kind), self.timestamp,
            self.proposer, self.state_root, self.body_hash,
        ]  # fmt: skip

    @property
    def hash(self) -> bytes:
        return sha256(pack(self.fields()))

    @classmethod
    def from_fields(cls, value: Any) -> Header:
        names = ("chain_id", "height", "parent", "kind", "timestamp", "proposer", "state_root", "body_hash")
        f = Fields(value, "header", names)
        kind = f.integer("kind", 0, 3)
        return cls(
            chain_id=f.text("chain_id"),
            height=f.integer("height"),
            parent=f.binary("parent", HASH_BYTES),
            kind=Kind(kind),
            timestamp=f.integer("timestamp", 0, 2**40),
            proposer=f.binary("proposer", PUBLIC_KEY_BYTES),
            state_root=f.binary("state_root", HASH_BYTES),
            body_hash=f.binary("body_hash", HASH_BYTES),
        )


@dataclass(frozen=True)
class TrainingBody:
    """A slice update and its claimed loss improvement on the validation batch."""

    slice_id: int
    """The slice this block updates; must be the one the parent assigns."""
    weights: bytes
    """The slice's new values: int16 little-endian, in the slice's element order."""
    loss_before: int
    """Claimed canonical validation loss total (Q.16) before the update."""
    loss_after: int
    """Claimed canonical validation loss total (Q.16) after the update."""
    steps: int
    """Optimizer steps the miner took (informative)."""
    data_seed: bytes
    """Seed of the miner's training batches (informative)."""

    def fields(self) -> list[Any]:
        return [self.slice_id, self.weights, self.loss_before, self.loss_after, self.steps, self.data_seed]

    @classmethod
    def from_fields(cls, value: Any) -> TrainingBody:
        f = Fields(value, "training body", ("slice_id", "weights", "loss_before", "loss_after", "steps", "data_seed"))
        return cls(
            slice_id=f.integer("slice_id", 0, 1 << 20),
            weights=f.binary("weights", max_length=MAX_WEIGHTS_BYTES),
            loss_before=f.integer("loss_before", 0, MAX_LOSS),
            loss_after=f.integer("loss_after", 0, MAX_LOSS),
            steps=f.integer("steps", 0, 1 << 32),
            data_seed=f.binary("data_seed", HASH_BYTES),
        )


@dataclass(frozen=True)
class Attestation:
    """A validator's out-of-sample evaluation of one training block."""

    validator: bytes
    """The validator's public key."""
    training_block: bytes
    """Hash of the training block evaluated."""
    parent: bytes
    """That training block's parent: two attestations with the same parent and
    different training blocks are an equivocation."""
    seed_signature: bytes
    """The validator's signature (TEST_SEED) over the training block hash; its
    SHA-256 seeds the test batch, so neither miner nor validator chooses it."""
    loss_before: int
    """Canonical test loss total (Q.16) before the update."""
    loss_after: int
    """Canonical test loss total (Q.16) after the update."""
    signature: bytes
    """The validator's signature (ATTESTATION) over all fields above."""

    def unsigned_fields(self) -> list[Any]:
        return [
            self.validator, self.training_block, self.parent, self.seed_signature, self.loss_before, self.loss_after,
        ]  # fmt: skip

    def fields(self) -> list[Any]:
        return [*self.unsigned_fields(), self.signature]

    @property
    def test_seed(self) -> bytes:
        return sha256(self.seed_signature)

    @property
    def gain(self) -> int:
        return self.loss_before - self.loss_after

    def is_signed_by_validator(self, domain: Domain) -> bool:
        """Both signatures verify under the validator's key."""
        return verify(
            self.validator, self.seed_signature, domain, MessageType.TEST_SEED, self.training_block
        ) and verify(self.validator, self.signature, domain, MessageType.ATTESTATION, pack(self.unsigned_fields()))

    @classmethod
    def from_fields(cls, value: Any) -> Attestation:
        names = ("validator", "training_block", "parent", "seed_signature", "loss_before", "loss_after", "signature")
        f = Fields(value, "attestation", names)
        return cls(
            validator=f.binary("validator", PUBLIC_KEY_BYTES),
            training_block=f.binary("training_block", HASH_BYTES),
            parent=f.binary("parent", HASH_BYTES),
            seed_signature=f.binary("seed_signature", SIGNATURE_BYTES),
            loss_before=f.integer("loss_before", 0, MAX_LOSS),
            loss_after=f.integer("loss_after", 0, MAX_LOSS),
            signature=f.binary("signature", SIGNATURE_BYTES),
        )


def sign_attestation(
    key: PrivateKey, domain: Domain, training_block: bytes, parent: bytes, loss_before: int, loss_after: int
) -> Attestation:
    """An attestation by `key` (the caller computed the losses on the batch of `test_seed_for`)."""
    seed_signature = key.sign(domain, MessageType.TEST_SEED, training_block)
    unsigned = Attestation(key.public_key, training_block, parent, seed_signature, loss_before, loss_after, b"")
    signature = key.sign(domain, MessageType.ATTESTATION, pack(unsigned.unsigned_fields()))
    return Attestation(key.public_key, training_block, parent, seed_signature, loss_before, loss_after, signature)


def test_seed_for(key: PrivateKey, domain: Domain, training_block: bytes) -> bytes:
    """The test-batch seed a validator must use for a training block."""
    return sha256(key.sign(domain, MessageType.TEST_SEED, training_block))


@dataclass(frozen=True)
class Evidence:
    """Two attestations by one validator for different training blocks on the same parent."""

    first: Attestation
    second: Attestation

    def fields(self) -> list[Any]:
        return [self.first.fields(), self.second.fields()]

    @classmethod
    def from_fields(cls, value: Any) -> Evidence:
        f = Fields(value, "evidence", ("first", "second"))
        return cls(Attestation.from_fields(f.raw("first")), Attestation.from_fields(f.raw("second")))


@dataclass(frozen=True)
class Reward:
    """One payout of a validation block."""

    address: bytes
    """Recipient public key."""
    amount: int
    """Units credited."""

    def fields(self) -> list[Any]:
        return [self.address, self.amount]

    @classmethod
    def from_fields(cls, value: Any) -> Reward:
        f = Fields(value, "reward", ("address", "amount"))
        return cls(f.binary("address", PUBLIC_KEY_BYTES), f.integer("amount"))


@dataclass(frozen=True)
class ValidationBody:
    """The out-of-sample verdict on the parent training block."""

    attestations: tuple[Attestation, ...]
    """Attestations from validators holding at least 2/3 of stake."""
    evidence: tuple[Evidence, ...] = ()
    """Equivocations to slash."""
    rewards: tuple[Reward, ...] = ()
    """The payout the rules assign (checked exactly)."""

    def fields(self) -> list[Any]:
        return [
            [a.fields() for a in self.attestations],
            [e.fields() for e in self.evidence],
            [r.fields() for r in self.rewards],
        ]

    @classmethod
    def from_fields(cls, value: Any) -> ValidationBody:
        f = Fields(value, "validation body", ("attestations", "evidence", "rewards"))
        return cls(
            attestations=tuple(Attestation.from_fields(item) for item in f.array("attestations", 1024)),
            evidence=tuple(Evidence.from_fields(item) for item in f.array("evidence", 64)),
            rewards=tuple(Reward.from_fields(item) for item in f.array("rewards", 1100)),
        )


MAX_TRAINING_PER_HEIGHT = 1
"""Training blocks a decided block may name (a list, so that several miners' work can count later)."""
MAX_EVIDENCE = 64


@dataclass(frozen=True)
class TrainingVerdict:
    """A decided block's out-of-sample test of one training block."""

    training_block: bytes
    """Hash of the training block (built on the decided block's parent)."""
    vrf_proof: bytes
    """The decided block's proposer's ECVRF proof (RFC 9381) over
    b"potchain/test" || parent || training_block; its output seeds the test batch."""
    loss_before: int
    """Canonical test loss total (Q.16) of the parent state's model on that batch."""
    loss_after: int
    """The same with the training block's slice applied."""

    @property
    def gain(self) -> int:
        return self.loss_before - self.loss_after

    def fields(self) -> list[Any]:
        return [self.training_block, self.vrf_proof, self.loss_before, self.loss_after]

    @classmethod
    def from_fields(cls, value: Any) -> TrainingVerdict:
        f = Fields(value, "training verdict", ("training_block", "vrf_proof", "loss_before", "loss_after"))
        return cls(
            training_block=f.binary("training_block", HASH_BYTES),
            vrf_proof=f.binary("vrf_proof", VRF_PROOF_BYTES),
            loss_before=f.integer("loss_before", 0, MAX_LOSS),
            loss_after=f.integer("loss_after", 0, MAX_LOSS),
        )


@dataclass(frozen=True)
class EquivocationEvidence:
    """Two conflicting messages one validator signed in one round (docs/spec.md, section 15)."""

    first: Proposal | Vote
    second: Proposal | Vote

    def fields(self) -> list[Any]:
        return [_tagged(self.first), _tagged(self.second)]

    @classmethod
    def from_fields(cls, value: Any) -> EquivocationEvidence:
        f = Fields(value, "evidence", ("first", "second"))
        return cls(_untagged(f.raw("first")), _untagged(f.raw("second")))


def _tagged(message: Proposal | Vote) -> list[Any]:
    return [1 if isinstance(message, Vote) else 2, message.fields()]


def _untagged(value: Any) -> Proposal | Vote:
    f = Fields(value, "evidence message", ("type", "message"))
    if f.integer("type", 1, 2) == 1:
        return Vote.from_fields(f.raw("message"))
    return Proposal.from_fields(f.raw("message"))


@dataclass(frozen=True)
class DecidedBody:
    """What one height decides: the training blocks it confirms or rejects (maybe none),
    the previous height's commit certificate, evidence to slash, and the payout."""

    training: tuple[TrainingVerdict, ...]
    """At most MAX_TRAINING_PER_HEIGHT training blocks on the parent, each with its test."""
    last_commit: Commit | None
    """The parent's commit certificate (None at height 1: genesis needs none)."""
    evidence: tuple[EquivocationEvidence, ...] = ()
    """Equivocations to slash."""
    rewards: tuple[Reward, ...] = ()
    """The payout the rules assign (checked exactly)."""

    def fields(self) -> list[Any]:
        return [
            [t.fields() for t in self.training],
            [] if self.last_commit is None else self.last_commit.fields(),
            [e.fields() for e in self.evidence],
            [r.fields() for r in self.rewards],
        ]

    @classmethod
    def from_fields(cls, value: Any) -> DecidedBody:
        f = Fields(value, "decided body", ("training", "last_commit", "evidence", "rewards"))
        commit = f.array("last_commit", 4)
        return cls(
            training=tuple(TrainingVerdict.from_fields(t) for t in f.array("training", MAX_TRAINING_PER_HEIGHT)),
            last_commit=Commit.from_fields(commit) if commit else None,
            evidence=tuple(EquivocationEvidence.from_fields(e) for e in f.array("evidence", MAX_EVIDENCE)),
            rewards=tuple(Reward.from_fields(r) for r in f.array("rewards", 1100)),
        )


@dataclass(frozen=True)
class GenesisBody:
    """Genesis has no body beyond its hash, carried in the header's body_hash."""

    def fields(self) -> list[Any]:
        return []


Body = TrainingBody | ValidationBody | DecidedBody | GenesisBody
_SIGNED_TYPES = {
    Kind.TRAINING: MessageType.TRAINING_BLOCK,
    Kind.VALIDATION: MessageType.VALIDATION_BLOCK,
    Kind.DECIDED: MessageType.DECIDED_BLOCK,
}


@dataclass(frozen=True)
class Block:
    """A header, its body and the proposer's signature over the block hash."""

    header: Header
    body: Body
    signature: bytes = b""
    hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", self.header.hash)

    def encode(self) -> bytes:
        return pack([self.header.fields(), self.body.fields(), self.signature])

    def is_signed_by_proposer(self, domain: Domain) -> bool:
        message_type = _SIGNED_TYPES.get(self.header.kind)
        if message_type is None:
            return False
        return verify(self.header.proposer, self.signature, domain, message_type, self.hash)


def body_hash(body: Body) -> bytes:
    return sha256(pack(body.fields()))


def sign_block(key: PrivateKey, domain: Domain, header: Header, body: Body) -> Block:
    """A block proposed and signed by `key` (header.proposer must be its public key)."""
    unsigned = Block(header, body)
    return Block(header, body, key.sign(domain, _SIGNED_TYPES[header.kind], unsigned.hash))


def decode_block(data: bytes) -> Block:
    """Parse a block; raises DecodeError naming the first problem."""
    f = Fields(unpack(data, "block"), "block", ("header", "body", "signature"))
    header = Header.from_fields(f.raw("header"))
    body: Body
    if header.kind == Kind.TRAINING:
        body = TrainingBody.from_fields(f.raw("body"))
    elif header.kind == Kind.VALIDATION:
        body = ValidationBody.from_fields(f.raw("body"))
    elif header.kind == Kind.DECIDED:
        body = DecidedBody.from_fields(f.raw("body"))
    else:
        Fields(f.raw("body"), "genesis body", ())
        body = GenesisBody()
    signature = f.binary("signature", max_length=SIGNATURE_BYTES)
    return Block(header, body, signature)


def decode_attestation(data: bytes) -> Attestation:
    return Attestation.from_fields(unpack(data, "attestation", 4096))
