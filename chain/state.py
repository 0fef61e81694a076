"""Chain state: the model's slices, accounts, difficulty and finality, and its root.

The model is held as its slices' contents (int16 little-endian bytes), each
addressed by its SHA-256, so successive states share unchanged slices. The
state root is a Merkle root over the weights root (slice hashes), the
accounts root and the scalar fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

from chain.encoding import Fields, pack, unpack

ZERO_HASH = bytes(32)


def merkle_root(leaves: list[bytes]) -> bytes:
    """Binary Merkle root: nodes are sha256(0x01 || left || right); an odd level
    is padded with the zero hash; no leaves give the zero hash."""
    level = list(leaves)
    if not level:
        return ZERO_HASH
    while len(level) > 1:
        if len(level) % 2:
            level.append(ZERO_HASH)
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


@dataclass(frozen=True)
class Account:
    """Balance and stake of one public key."""

    balance: int
    """Spendable units."""
    stake: int
    """Staked units; a validator is an account with stake > 0."""


@dataclass(frozen=True)
class HeldOut:
    """A validator's held-out shard as the chain knows it: its commitment and what it revealed."""

    root: bytes
    """Merkle root of the shard's sequence leaves (chain/heldout.py), committed in genesis."""
    sequences: int
    """How many sequences the shard holds."""
    revealed: bytes
    """Bitmap of the sequences already revealed (bit i is bit i % 8 of byte i // 8): never used to test again."""


@dataclass(frozen=True)
class State:
    """Everything the rules read and write. Never mutated: transitions return a new State."""

    slices: tuple[bytes, ...]
    """Each slice's content: int16 little-endian values in the slice's element order."""
    accounts: Mapping[bytes, Account]
    """Accounts by public key."""
    difficulty: int
    """Minimum validation gain (Q.16 loss units over the validation batch) of a training block."""
    finalized_height: int
    """Height of the decided block this state follows (0: genesis); the names are historical (spec section 7)."""
    finalized_hash: bytes
    """Hash of the last training block a decided block named, confirmed or rejected (genesis hash at first)."""
    finalized_timestamp: int
    """The difficulty's retarget clock: when it last restarted (genesis timestamp at first)."""
    heldout: Mapping[bytes, HeldOut] = field(default_factory=dict)
    """Validators' held-out shards by public key (docs/spec.md, section 17)."""
    slice_hashes: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slice_hashes", tuple(hashlib.sha256(s).digest() for s in self.slices))

    @cached_property
    def weights_root(self) -> bytes:
        return merkle_root(list(self.slice_hashes))

    @cached_property
    def accounts_root(self) -> bytes:
        leaves = [
            hashlib.sha256(pack([address, account.balance, account.stake])).digest()
            for address, account in sorted(self.accounts.items())
        ]
        return merkle_root(leaves)

    @cached_property
    def heldout_root(self) -> bytes:
        leaves = [
            hashlib.sha256(pack([address, shard.root, shard.sequences, shard.revealed])).digest()
            for address, shard in sorted(self.heldout.items())
        ]
        return merkle_root(leaves)

    @cached_property
    def root(self) -> bytes:
        scalars = hashlib.sha256(
            pack([self.difficulty, self.finalized_height, self.finalized_hash, self.finalized_timestamp])
        ).digest()
        return merkle_root([self.weights_root, self.accounts_root, scalars, self.heldout_root])

    @property
    def total_stake(self) -> int:
        return sum(account.stake for account in self.accounts.values())

    def stake_of(self, address: bytes) -> int:
        account = self.accounts.get(address)
        return account.stake if account else 0

    def with_slice(self, slice_id: int, content: bytes) -> State:
        slices = list(self.slices)
        slices[slice_id] = content
        return replace(self, slices=tuple(slices))

    def record(self) -> bytes:
        """The state without slice contents (they are stored by hash)."""
        accounts = [[address, a.balance, a.stake] for address, a in sorted(self.accounts.items())]
        heldout = [[address, h.root, h.sequences, h.revealed] for address, h in sorted(self.heldout.items())]
        return pack([
            list(self.slice_hashes), accounts, self.difficulty, self.finalized_height,
            self.finalized_hash, self.finalized_timestamp, heldout,
        ])  # fmt: skip


StateFields = tuple[list[bytes], dict[bytes, Account], int, int, bytes, int, dict[bytes, HeldOut]]


def decode_state_record(data: bytes) -> StateFields:
    """(slice hashes, accounts, difficulty, finalized height, finalized hash, finalized timestamp, held-out shards)."""
    names = (
        "slice_hashes", "accounts", "difficulty", "finalized_height", "finalized_hash", "finalized_timestamp",
        "heldout",
    )  # fmt: skip
    f = Fields(unpack(data, "state record"), "state record", names)
    hashes = [bytes(h) for h in f.array("slice_hashes")]
    accounts: dict[bytes, Account] = {}
    for item in f.array("accounts"):
        a = Fields(item, "account", ("address", "balance", "stake"))
        accounts[a.binary("address", 32)] = Account(a.integer("balance"), a.integer("stake"))
    heldout: dict[bytes, HeldOut] = {}
    for item in f.array("heldout"):
        h = Fields(item, "held-out shard", ("address", "root", "sequences", "revealed"))
        sequences = h.integer("sequences", 1, 1 << 20)
        heldout[h.binary("address", 32)] = HeldOut(
            h.binary("root", 32), sequences, h.binary("revealed", (sequences + 7) // 8)
        )
    return (
        hashes,
        accounts,
        f.integer("difficulty"),
        f.integer("finalized_height"),
        f.binary("finalized_hash", 32),
        f.integer("finalized_timestamp"),
        heldout,
    )


def state_from_record(record: bytes, slice_contents: Mapping[bytes, bytes]) -> State:
    hashes, accounts, difficulty, height, finalized, timestamp, heldout = decode_state_record(record)
    return State(tuple(slice_contents[h] for h in hashes), accounts, difficulty, height, finalized, timestamp, heldout)
