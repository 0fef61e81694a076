"""Held-out shards: a validator's private test data, committed, then revealed when it judges.

A validator's **shard** is a list of sequences of `context + 1` bytes of text
nobody else has seen. Its commitment, in genesis, is the Merkle root over the
sequences' leaves (`sequence_leaf`) and their count. When the validator
proposes a decided block that tests training blocks, the chain's randomness
(the proposer's ECVRF output, which it cannot choose) picks sequences of its
shard that were never revealed (`select_indices`); the block reveals them with
Merkle proofs (`merkle_proof`, checked by `verify_merkle_proof`), every node
checks the test losses on them, and the state marks them revealed (a bitmap
per validator, `with_revealed`): they never judge again, and are public
training data from then on (docs/spec.md, section 17).

A shard file (`save_shard`/`load_shard`) is `MAGIC`, the sequence length and
the count as 4-byte big-endian integers, then the sequences back to back.
`shard_from_text` cuts text into disjoint sequences; `devnet_shards` gives the
devnet's validators INSECURE shards cut from the public test documents (like
the devnet's name keys: for development only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from chain.files import SECRET_MODE, write_atomically

ZERO_HASH = bytes(32)
MAGIC = b"potchain-heldout-1\n"
MAX_SHARD_SEQUENCES = 1 << 20
"""Sequences a shard may commit to (its revealed bitmap is at most 128 KiB of state)."""
MAX_PROOF_HASHES = 20
"""Siblings on a Merkle path of a shard at its largest (2**20 leaves)."""
SELECTION_ATTEMPTS_PER_SEQUENCE = 64
"""Random draws per wanted sequence before `select_indices` scans upward instead."""


class ShardError(ValueError):
    """A shard file or text that cannot make a shard; the message says why."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sequence_leaf(sequence: bytes) -> bytes:
    """A sequence's Merkle leaf: sha256(0x00 || sequence) (inner nodes hash 0x01 || left || right)."""
    return sha256(b"\x00" + sequence)


def _parent(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def merkle_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first; an odd level is padded with the zero hash
    (the same tree as `chain.state.merkle_root`)."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        level = levels[-1] + ([ZERO_HASH] if len(levels[-1]) % 2 else [])
        levels.append([_parent(level[i], level[i + 1]) for i in range(0, len(level), 2)])
    return levels


def merkle_proof(levels: list[list[bytes]], index: int) -> tuple[bytes, ...]:
    """The siblings on the path from leaf `index` to the root, lowest first."""
    proof = []
    for level in levels[:-1]:
        sibling = index ^ 1
        proof.append(level[sibling] if sibling < len(level) else ZERO_HASH)
        index //= 2
    return tuple(proof)


def proof_length(count: int) -> int:
    """Siblings on every path of a tree of `count` leaves: ceil(log2(count))."""
    return max(0, (count - 1).bit_length())


def verify_merkle_proof(root: bytes, count: int, index: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """Whether `leaf` is leaf `index` of the tree of `count` leaves with root `root`."""
    if not 0 <= index < count or len(proof) != proof_length(count):
        return False
    node = leaf
    for sibling in proof:
        node = _parent(sibling, node) if index & 1 else _parent(node, sibling)
        index //= 2
    return node == root


# --- Which sequences judge --------------------------------------------------------


def is_revealed(bitmap: bytes, index: int) -> bool:
    """Bit `index` of a revealed bitmap (bit i is bit i % 8 of byte i // 8)."""
    return bool(bitmap[index // 8] >> (index % 8) & 1)


def empty_bitmap(count: int) -> bytes:
    return bytes((count + 7) // 8)


def with_revealed(bitmap: bytes, indices: Iterable[int]) -> bytes:
    marked = bytearray(bitmap)
    for index in indices:
        marked[index // 8] |= 1 << (index % 8)
    return bytes(marked)


def count_revealed(bitmap: bytes) -> int:
    return sum(bin(byte).count("1") for byte in bitmap)


def select_indices(seed: bytes, bitmap: bytes, count: int, wanted: int) -> tuple[int, ...] | None:
    """The `wanted` unrevealed sequences a test reveals, from a 32-byte seed; None when
    fewer than `wanted` are left (the shard is spent).

    Draw i is `int_be(sha256(b"potchain/heldout-index" || seed || i as 4 bytes)[0:8]) mod count`;
    a revealed or already chosen index is skipped. After
    SELECTION_ATTEMPTS_PER_SEQUENCE * wanted draws (a nearly spent shard), the rest are
    the first unrevealed, unchosen indices upward from the last draw, wrapping around."""
    if count - count_revealed(bitmap) < wanted:
        return None
    chosen: list[int] = []
    taken: set[int] = set()
    draw = 0
    index = 0
    while len(chosen) < wanted and draw < SELECTION_ATTEMPTS_PER_SEQUENCE * wanted:
        digest = sha256(b"potchain/heldout-index" + seed + draw.to_bytes(4, "big"))
        index = int.from_bytes(digest[:8], "big") % count
        draw += 1
        if index not in taken and not is_revealed(bitmap, index):
            chosen.append(index)
            taken.add(index)
    while len(chosen) < wanted:
        index = (index + 1) % count
        if index not in taken and not is_revealed(bitmap, index):
            chosen.append(index)
            taken.add(index)
    return tuple(chosen)


# --- Shards ------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """A validator's held-out sequences, kept private until they judge."""

    sequence_bytes: int
    """Bytes per sequence: the model's context + 1 (inputs and targets overlap by all but one)."""
    sequences: tuple[bytes, ...]
    """The sequences, in committed order."""
    _levels: list[list[bytes]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.sequences) <= MAX_SHARD_SEQUENCES:
            raise ShardError(f"shard: {len(self.sequences)} sequences, want 1 to {MAX_SHARD_SEQUENCES}")
        for index, sequence in enumerate(self.sequences):
            if len(sequence) != self.sequence_bytes:
                raise ShardError(f"shard: sequence {index} has {len(sequence)} bytes, want {self.sequence_bytes}")

    @cached_property
    def levels(self) -> list[list[bytes]]:
        return merkle_levels([sequence_leaf(s) for s in self.sequences])

    @property
    def root(self) -> bytes:
        """The commitment: the Merkle root of the sequences' leaves."""
        return self.levels[-1][0]

    @property
    def count(self) -> int:
        return len(self.sequences)

    def proof(self, index: int) -> tuple[bytes, ...]:
        return merkle_proof(self.levels, index)


def shard_from_text(text: bytes, sequence_bytes: int) -> Shard:
    """Cut text into disjoint sequences of `sequence_bytes` (a shorter tail is dropped)."""
    count = len(text) // sequence_bytes
    if count == 0:
        raise ShardError(f"text: {len(text)} bytes, too short for one sequence of {sequence_bytes}")
    return Shard(sequence_bytes, tuple(text[i * sequence_bytes : (i + 1) * sequence_bytes] for i in range(count)))


def devnet_shards(test_text: bytes, sequence_bytes: int, validators: int) -> list[Shard]:
    """INSECURE shards for development networks, from the PUBLIC test documents: the text's
    disjoint sequences dealt in turn to validators 0, 1, ..., `validators - 1` (genesis order).
    Anyone can rebuild them: a miner can train on them. Never for a real network."""
    whole = shard_from_text(test_text, sequence_bytes)
    if whole.count < validators:
        raise ShardError(f"test text: {whole.count} sequences for {validators} validators")
    return [Shard(sequence_bytes, whole.sequences[i::validators]) for i in range(validators)]


def save_shard(shard: Shard, path: Path) -> None:
    """Write a shard file (owner-readable only: it is private until revealed)."""
    header = MAGIC + shard.sequence_bytes.to_bytes(4, "big") + shard.count.to_bytes(4, "big")
    write_atomically(path, header + b"".join(shard.sequences), SECRET_MODE)


def load_shard(path: Path) -> Shard:
    """Read a shard file; raises ShardError naming the file and the problem."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ShardError(f"{path}: cannot read the held-out shard ({error.strerror})") from None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise ShardError(f"{path}: not a held-out shard file (want it to start with {MAGIC!r})")
    offset = len(MAGIC)
    sequence_bytes = int.from_bytes(data[offset : offset + 4], "big")
    count = int.from_bytes(data[offset + 4 : offset + 8], "big")
    body = data[offset + 8 :]
    if sequence_bytes == 0 or len(body) != sequence_bytes * count:
        raise ShardError(f"{path}: {len(body)} bytes of sequences, want {count} of {sequence_bytes}")
    try:
        return Shard(sequence_bytes, tuple(body[i * sequence_bytes : (i + 1) * sequence_bytes] for i in range(count)))
    except ShardError as error:
        raise ShardError(f"{path}: {error}") from None
