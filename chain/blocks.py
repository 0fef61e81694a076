"""Blocks and equivocation evidence, with their canonical encodings and hashes.

A block is a header, a body and the proposer's signature. The header commits
to the body by `body_hash`; the block hash is the SHA-256 of the encoded
header. Training blocks carry a slice update and its loss-improvement claim;
decided blocks carry the out-of-sample verdict on the training block they
name (if any), the parent's commit certificate, slashing evidence, and the
reward payout (docs/spec.md, sections 6 and 16).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from chain.crypto import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Domain, MessageType, PrivateKey, verify
from chain.encoding import MAX_MESSAGE_BYTES, DecodeError, Fields, pack, unpack
from chain.heldout import MAX_PROOF_HASHES, MAX_SHARD_SEQUENCES
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
    # 2 is retired: an earlier version's validation block (finality by attestations).
    # No rule accepts it, and a header of kind 2 does not decode (RETIRED_KINDS).
    DECIDED = 3
    """The block one height's voting rounds decide (docs/spec.md, section 16)."""


RETIRED_KINDS = {2: "an earlier version's validation block, finalized by attestations"}
"""Header kinds no longer in use, never to be reused, with what they were."""


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
    """Genesis, training or decided."""
    timestamp: int
    """Unix seconds; strictly above the parent's."""
    proposer: bytes
    """Ed25519 public key of the miner (training) or of the validator that proposed it (decided)."""
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
        if kind in RETIRED_KINDS:
            raise DecodeError(f"header: kind {kind} is retired ({RETIRED_KINDS[kind]}), not a block of this chain")
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
class Reward:
    """One payout of a decided block."""

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


MAX_TRAINING_PER_HEIGHT = 4
"""Training blocks a decided block may test; the committed ones that gain out of sample are
combined (docs/spec.md, section 18)."""
MAX_NAMED_WEIGHTS_BYTES = 40 << 20
"""What MAX_TRAINING_PER_HEIGHT slices may weigh together: genesis keeps every slice within
a quarter of it, so that a height and the training blocks it names fit one sync answer."""
MAX_EVIDENCE = 64
MAX_REWARDS = 1100
"""Payouts a decided block may carry."""
MAX_COMMITMENTS = 256
"""Update commitments a decided block may carry."""
MAX_REVEALED = 4096
"""Held-out sequences one test may reveal (genesis's test_sequences is at most this)."""
MAX_SEQUENCE_BYTES = 65537
"""A revealed sequence's length at most: the largest context + 1."""
MAX_PROOF_BYTES = 32 * MAX_PROOF_HASHES
MAX_BLOCK_OBJECTS = 1 << 15
"""Objects a block's encoding may hold: a decided block at every array limit holds 26,447
(tests/test_encoding.py), a training block 18."""


def compute_update_hash(miner: bytes, slice_id: int, weights: bytes) -> bytes:
    """What a miner commits to before it reveals an update (docs/spec.md, section 17):
    sha256(b"potchain/update" || miner || slice_id as 4 bytes big-endian || weights).
    The miner's key is inside, so a copy under another key has another hash."""
    return sha256(b"potchain/update" + miner + slice_id.to_bytes(4, "big") + weights)


@dataclass(frozen=True)
class UpdateCommitment:
    """A miner's signed commitment to an update it will reveal on the decided block of `height`."""

    height: int
    """The height of the decided block that carries it; the update is revealed on that block."""
    miner: bytes
    """The miner's Ed25519 public key."""
    update_hash: bytes
    """`compute_update_hash(miner, slice_id, weights)` of the update."""
    signature: bytes
    """The miner's signature (message type 9) over sha256(encode([height, update_hash]))."""

    def signed_payload(self) -> bytes:
        return sha256(pack([self.height, self.update_hash]))

    def fields(self) -> list[Any]:
        return [self.height, self.miner, self.update_hash, self.signature]

    def is_signed_by_miner(self, domain: Domain) -> bool:
        return verify(self.miner, self.signature, domain, MessageType.UPDATE_COMMITMENT, self.signed_payload())

    def encode(self) -> bytes:
        return pack(self.fields())

    @classmethod
    def from_fields(cls, value: Any) -> UpdateCommitment:
        f = Fields(value, "update commitment", ("height", "miner", "update_hash", "signature"))
        return cls(
            height=f.integer("height"),
            miner=f.binary("miner", PUBLIC_KEY_BYTES),
            update_hash=f.binary("update_hash", HASH_BYTES),
            signature=f.binary("signature", SIGNATURE_BYTES),
        )


def sign_update_commitment(key: PrivateKey, domain: Domain, height: int, update_hash: bytes) -> UpdateCommitment:
    """`key`'s commitment to an update it reveals on the decided block of `height`."""
    unsigned = UpdateCommitment(height, key.public_key, update_hash, b"")
    signature = key.sign(domain, MessageType.UPDATE_COMMITMENT, unsigned.signed_payload())
    return UpdateCommitment(height, key.public_key, update_hash, signature)


def decode_update_commitment(data: bytes) -> UpdateCommitment:
    return UpdateCommitment.from_fields(unpack(data, "update commitment", 1024, 8))


@dataclass(frozen=True)
class RevealedSequence:
    """One held-out sequence a test reveals, with its Merkle proof against the shard's commitment."""

    index: int
    """Its position in the shard."""
    sequence: bytes
    """Its bytes (context + 1)."""
    proof: bytes
    """The siblings on its Merkle path, lowest first, 32 bytes each (chain/heldout.py)."""

    def fields(self) -> list[Any]:
        return [self.index, self.sequence, self.proof]

    @property
    def siblings(self) -> tuple[bytes, ...]:
        return tuple(self.proof[i : i + HASH_BYTES] for i in range(0, len(self.proof), HASH_BYTES))

    @classmethod
    def from_fields(cls, value: Any) -> RevealedSequence:
        f = Fields(value, "revealed sequence", ("index", "sequence", "proof"))
        return cls(
            index=f.integer("index", 0, MAX_SHARD_SEQUENCES - 1),
            sequence=f.binary("sequence", max_length=MAX_SEQUENCE_BYTES),
            proof=f.binary("proof", max_length=MAX_PROOF_BYTES),
        )


@dataclass(frozen=True)
class HeldOutTest:
    """A decided block's out-of-sample test: held-out sequences of its proposer's shard,
    picked by the proposer's ECVRF output, revealed with their proofs."""

    vrf_proof: bytes
    """The proposer's ECVRF proof (RFC 9381) over b"potchain/test" || parent; its output picks the sequences."""
    loss_before: int
    """Canonical loss total (Q.16) of the parent state's model on the revealed sequences."""
    sequences: tuple[RevealedSequence, ...]
    """The revealed sequences, in the order the output picks them."""
    loss_after: int = 0
    """Canonical loss total (Q.16) on the revealed sequences of the state the block leads to:
    with the applied updates combined (`loss_before` when it applies none)."""

    def fields(self) -> list[Any]:
        return [self.vrf_proof, self.loss_before, [s.fields() for s in self.sequences], self.loss_after]

    @classmethod
    def from_fields(cls, value: Any) -> HeldOutTest:
        f = Fields(value, "held-out test", ("vrf_proof", "loss_before", "sequences", "loss_after"))
        return cls(
            vrf_proof=f.binary("vrf_proof", VRF_PROOF_BYTES),
            loss_before=f.integer("loss_before", 0, MAX_LOSS),
            sequences=tuple(RevealedSequence.from_fields(s) for s in f.array("sequences", MAX_REVEALED)),
            loss_after=f.integer("loss_after", 0, MAX_LOSS),
        )


@dataclass(frozen=True)
class TrainingVerdict:
    """A decided block's out-of-sample result for one training block."""

    training_block: bytes
    """Hash of the training block (built on the decided block's parent)."""
    loss_after: int
    """Canonical loss total (Q.16) on the block's held-out test with the training block's slice applied."""

    def fields(self) -> list[Any]:
        return [self.training_block, self.loss_after]

    @classmethod
    def from_fields(cls, value: Any) -> TrainingVerdict:
        f = Fields(value, "training verdict", ("training_block", "loss_after"))
        return cls(
            training_block=f.binary("training_block", HASH_BYTES),
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
    """What one height decides: the training blocks it tests out of sample (maybe none) and
    the held-out test they share, the update commitments of the next height's miners, the
    previous height's commit certificate, evidence to slash, and the payout."""

    training: tuple[TrainingVerdict, ...]
    """At most MAX_TRAINING_PER_HEIGHT training blocks on the parent, each with its test loss."""
    test: HeldOutTest | None
    """The held-out test of the named training blocks (None if it names none)."""
    commitments: tuple[UpdateCommitment, ...]
    """Miners' commitments to updates they reveal on this block (one per miner)."""
    last_commit: Commit | None
    """The parent's commit certificate (None at height 1: genesis needs none)."""
    evidence: tuple[EquivocationEvidence, ...] = ()
    """Equivocations to slash."""
    rewards: tuple[Reward, ...] = ()
    """The payout the rules assign (checked exactly)."""
    applied: tuple[bytes, ...] = ()
    """The training blocks whose updates the block applies, combined, best-ranked first (the
    rules pick them: docs/spec.md, section 18; checked exactly); empty when it applies none."""

    def gains(self) -> dict[bytes, int]:
        """Each named training block's test gain (loss before minus after), by hash."""
        if self.test is None:
            return {}
        return {v.training_block: self.test.loss_before - v.loss_after for v in self.training}

    def gain_of(self, training_block: bytes) -> int | None:
        """A named training block's test gain (None if not named)."""
        return self.gains().get(training_block)

    def fields(self) -> list[Any]:
        return [
            [t.fields() for t in self.training],
            [] if self.test is None else self.test.fields(),
            [c.fields() for c in self.commitments],
            [] if self.last_commit is None else self.last_commit.fields(),
            [e.fields() for e in self.evidence],
            [r.fields() for r in self.rewards],
            list(self.applied),
        ]

    @classmethod
    def from_fields(cls, value: Any) -> DecidedBody:
        names = ("training", "test", "commitments", "last_commit", "evidence", "rewards", "applied")
        f = Fields(value, "decided body", names)
        test = f.array("test", 4)
        commit = f.array("last_commit", 4)
        return cls(
            training=tuple(TrainingVerdict.from_fields(t) for t in f.array("training", MAX_TRAINING_PER_HEIGHT)),
            test=HeldOutTest.from_fields(test) if test else None,
            commitments=tuple(UpdateCommitment.from_fields(c) for c in f.array("commitments", MAX_COMMITMENTS)),
            last_commit=Commit.from_fields(commit) if commit else None,
            evidence=tuple(EquivocationEvidence.from_fields(e) for e in f.array("evidence", MAX_EVIDENCE)),
            rewards=tuple(Reward.from_fields(r) for r in f.array("rewards", MAX_REWARDS)),
            applied=tuple(_applied(h) for h in f.array("applied", MAX_TRAINING_PER_HEIGHT)),
        )


def _applied(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        raise DecodeError(f"decided body.applied: want {HASH_BYTES}-byte hashes, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class GenesisBody:
    """Genesis has no body beyond its hash, carried in the header's body_hash."""

    def fields(self) -> list[Any]:
        return []


Body = TrainingBody | DecidedBody | GenesisBody
_SIGNED_TYPES = {
    Kind.TRAINING: MessageType.TRAINING_BLOCK,
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
    f = Fields(unpack(data, "block", MAX_MESSAGE_BYTES, MAX_BLOCK_OBJECTS), "block", ("header", "body", "signature"))
    header = Header.from_fields(f.raw("header"))
    body: Body
    if header.kind == Kind.TRAINING:
        body = TrainingBody.from_fields(f.raw("body"))
    elif header.kind == Kind.DECIDED:
        body = DecidedBody.from_fields(f.raw("body"))
    else:
        Fields(f.raw("body"), "genesis body", ())
        body = GenesisBody()
    signature = f.binary("signature", max_length=SIGNATURE_BYTES)
    return Block(header, body, signature)
