"""Every LevelDB key the node writes, built in one place."""

from __future__ import annotations

FORMAT_VERSION = b"1"

META_FORMAT = b"m:format"
META_GENESIS = b"m:genesis"
META_HEAD = b"m:head"
META_FINALIZED = b"m:finalized"


def block_key(block_hash: bytes) -> bytes:
    """Encoded block by its hash."""
    return b"b:" + block_hash


def state_key(block_hash: bytes) -> bytes:
    """State record (slice hashes, accounts, scalars) after a block."""
    return b"s:" + block_hash


def slice_key(slice_hash: bytes) -> bytes:
    """Slice content by its SHA-256 (content-addressed: states share slices)."""
    return b"c:" + slice_hash


def canonical_key(height: int) -> bytes:
    """Canonical block hash at a height (8-byte big-endian, so keys sort by height)."""
    return b"n:" + height.to_bytes(8, "big")


def commit_key(block_hash: bytes) -> bytes:
    """A decided block's commit certificate, by the block's hash."""
    return b"k:" + block_hash


PENDING_PREFIX = b"p:"
"""Blocks a key of this node signed for at the height being decided (see `pending_key`)."""


def pending_key(height: int, block_hash: bytes) -> bytes:
    """A block a key of this node signed a proposal or vote for at `height`, not decided (yet):
    the candidate and the training blocks it names. Neither decided nor canonical (`b:` holds
    those); 8-byte big-endian height first, so a decision deletes its height's and lower ones."""
    return PENDING_PREFIX + height.to_bytes(8, "big") + block_hash
