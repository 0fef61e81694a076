"""The chain database on LevelDB (plyvel).

Every public write is one atomic, synced write batch: a decision stores the
decided block, its state record, new slice contents, the training blocks it
names, its commit certificate, the height index, the head and the finalized
block together, or nothing at all (a decided block is final: nothing ever
leaves the canonical chain); it also deletes the pending blocks of its
height and below. Pending blocks (`keep_pending`) are the candidates a
validator key of the node signed a proposal or vote for, with the training
blocks they name, kept so that a validator locked on one still holds it
after a restart; they are never decided or canonical blocks.
Opening checks the store's format, its genesis, and that the head and the
finalized block, their states and their slices are all present and decode;
a store that fails these checks raises `CorruptStore`, never starts silently.

A write that fails (a full disk, an I/O error) raises `StorageError` naming
the directory, what was written and why ("writing height 12: ... No space
left on device"), and changes nothing the store reads back: LevelDB applies a
batch to its view only once the batch is in its log. The store then refuses
every later write (a failed append may leave a torn record at the log's end,
harmless there, which a later append would bury mid-log); reopening it after
space is freed recovers the last complete batch (the failed one too, if its
record reached the log whole before the error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import plyvel

from chain import schema
from chain.blocks import Block, decode_block
from chain.encoding import DecodeError
from chain.state import State, decode_state_record
from chain.votes import Commit, decode_commit


class CorruptStore(Exception):
    """The database is unreadable or inconsistent."""


class StorageError(Exception):
    """A write to the database failed (a full disk, an I/O error): the store's view
    is as before the write, and the store refuses later writes until reopened."""


class ChainDB:
    """Blocks, states and the canonical chain of one network."""

    def __init__(self, path: Path, genesis_hash: bytes, genesis: Block, genesis_state: State) -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            self.db = plyvel.DB(str(path), create_if_missing=True, paranoid_checks=True)
        except plyvel.CorruptionError as error:
            raise CorruptStore(f"{path}: LevelDB corruption: {error}") from None
        except plyvel.IOError as error:
            raise CorruptStore(f"{path}: cannot open LevelDB: {error}") from None
        self.path = path
        self.failure: str | None = None
        """Why a write failed, once one has (later writes are refused)."""
        stored_format = self.db.get(schema.META_FORMAT)
        try:
            if stored_format is None:
                self._initialize(genesis_hash, genesis, genesis_state)
            else:
                self._check(stored_format, genesis_hash)
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def _initialize(self, genesis_hash: bytes, genesis: Block, state: State) -> None:
        def fill(batch: plyvel.WriteBatch) -> None:
            self._put_block(batch, genesis, state)
            batch.put(schema.canonical_key(0), genesis.hash)
            batch.put(schema.META_HEAD, genesis.hash)
            batch.put(schema.META_FINALIZED, genesis.hash)
            batch.put(schema.META_GENESIS, genesis_hash)
            batch.put(schema.META_FORMAT, schema.FORMAT_VERSION)

        self._write("writing genesis", fill)

    def _check(self, stored_format: bytes, genesis_hash: bytes) -> None:
        if stored_format != schema.FORMAT_VERSION:
            raise CorruptStore(f"{self.path}: store format {stored_format!r}, want {schema.FORMAT_VERSION!r}")
        stored_genesis = self.db.get(schema.META_GENESIS)
        if stored_genesis != genesis_hash:
            got = stored_genesis.hex() if stored_genesis else None
            raise CorruptStore(f"{self.path}: genesis {got}, this node runs {genesis_hash.hex()}")
        for name, key in (("head", schema.META_HEAD), ("finalized", schema.META_FINALIZED)):
            block_hash = self.db.get(key)
            if block_hash is None:
                raise CorruptStore(f"{self.path}: no {name} pointer")
            try:
                self.block(block_hash)
                self.state(block_hash)
            except KeyError as error:
                raise CorruptStore(f"{self.path}: {name} block {block_hash.hex()}: {error.args[0]}") from None
            except DecodeError as error:
                raise CorruptStore(f"{self.path}: {name} block {block_hash.hex()}: {error}") from None

    # --- reads ----------------------------------------------------------------

    def head(self) -> bytes:
        return self._get(schema.META_HEAD)

    def finalized(self) -> bytes:
        return self._get(schema.META_FINALIZED)

    def has_block(self, block_hash: bytes) -> bool:
        return self.db.get(schema.block_key(block_hash)) is not None

    def block(self, block_hash: bytes) -> Block:
        return decode_block(self._get(schema.block_key(block_hash)))

    def state(self, block_hash: bytes) -> State:
        hashes, accounts, difficulty, height, finalized, timestamp, heldout = decode_state_record(
            self._get(schema.state_key(block_hash))
        )
        slices = tuple(self._get(schema.slice_key(h)) for h in hashes)
        state = State(slices, accounts, difficulty, height, finalized, timestamp, heldout)
        if state.slice_hashes != tuple(hashes):
            raise DecodeError(f"state of {block_hash.hex()}: a slice does not match its hash")
        return state

    def pending_block(self, height: int, block_hash: bytes) -> Block | None:
        """A block kept pending at `height` (`keep_pending`), if there is one."""
        data = self.db.get(schema.pending_key(height, block_hash))
        return None if data is None else decode_block(data)

    def has_pending(self, height: int, block_hash: bytes) -> bool:
        """Whether a block is kept pending at `height` (without reading it: a training block is large)."""
        return self._has(schema.pending_key(height, block_hash))

    def pending_keys(self) -> list[tuple[int, bytes]]:
        """(height, block hash) of every pending block, in key order."""
        prefix = len(schema.PENDING_PREFIX)
        return [
            (int.from_bytes(key[prefix : prefix + 8], "big"), key[prefix + 8 :])
            for key in self.db.iterator(prefix=schema.PENDING_PREFIX, include_value=False)
        ]

    def slice_content(self, slice_hash: bytes) -> bytes | None:
        return self.db.get(schema.slice_key(slice_hash))  # type: ignore[no-any-return]

    def commit(self, block_hash: bytes) -> Commit | None:
        """A decided block's commit certificate, if stored."""
        data = self.db.get(schema.commit_key(block_hash))
        return None if data is None else decode_commit(data)

    def canonical_hash(self, height: int) -> bytes | None:
        return self.db.get(schema.canonical_key(height))  # type: ignore[no-any-return]

    def canonical_blocks(self) -> Iterator[Block]:
        """The canonical chain from genesis to the head, in order."""
        height = 0
        while (block_hash := self.canonical_hash(height)) is not None:
            yield self.block(block_hash)
            height += 1

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every key and value, in key order (for tests and diagnostics)."""
        return list(self.db.iterator())

    def _has(self, key: bytes) -> bool:
        with self.db.iterator(start=key, include_value=False) as keys:
            return next(keys, None) == key

    def _get(self, key: bytes) -> bytes:
        value = self.db.get(key)
        if value is None:
            raise KeyError(f"missing key {key[:2].decode()}{key[2:].hex()}")
        return value  # type: ignore[no-any-return]

    # --- writes -----------------------------------------------------------------

    def _write(self, what: str, fill: Callable[[plyvel.WriteBatch], None]) -> None:
        """One atomic, synced batch filled by `fill`; StorageError if it fails or a write failed before."""
        if self.failure is not None:
            raise StorageError(
                f"{self.path}: {what}: refused, an earlier write failed ({self.failure}); "
                "restart the node once the disk is fixed"
            )
        try:
            with self.db.write_batch(transaction=True, sync=True) as batch:
                fill(batch)
        except plyvel.Error as error:
            self.failure = f"{what}: {describe_error(error)}"
            raise StorageError(f"{self.path}: {self.failure}") from error

    def _put_block(self, batch: plyvel.WriteBatch, block: Block, state: State) -> None:
        batch.put(schema.block_key(block.hash), block.encode())
        batch.put(schema.state_key(block.hash), state.record())
        for slice_hash, content in zip(state.slice_hashes, state.slices, strict=True):
            if self.db.get(schema.slice_key(slice_hash)) is None:
                batch.put(schema.slice_key(slice_hash), content)

    def import_decision(self, block: Block, state: State, commit: Commit, training_blocks: tuple[Block, ...]) -> None:
        """Store a decided block with its commit certificate and the training blocks
        it names, and make it the head and the finalized block, in one atomic batch.
        A decided block is final: it extends the canonical chain, nothing leaves it.
        Raises StorageError if the write fails (see the module docstring)."""

        def fill(batch: plyvel.WriteBatch) -> None:
            self._put_block(batch, block, state)
            for training in training_blocks:
                batch.put(schema.block_key(training.hash), training.encode())
            batch.put(schema.commit_key(block.hash), commit.encode())
            batch.put(schema.canonical_key(block.header.height), block.hash)
            batch.put(schema.META_HEAD, block.hash)
            batch.put(schema.META_FINALIZED, block.hash)
            stop = schema.pending_key(block.header.height + 1, b"")
            for key in self.db.iterator(start=schema.PENDING_PREFIX, stop=stop, include_value=False):
                batch.delete(key)

        self._write(f"writing height {block.header.height}", fill)

    def keep_pending(self, height: int, blocks: tuple[Block, ...]) -> None:
        """Keep blocks pending at `height` (a candidate a validator key of the node signs for,
        with the training blocks it names), each one not already kept, in one atomic batch;
        the decision of `height` deletes them. Raises StorageError if the write fails."""
        if height < 1:
            raise ValueError(f"pending height: got {height}, want at least 1")
        new = [block for block in blocks if not self.has_pending(height, block.hash)]
        if not new:
            return

        def fill(batch: plyvel.WriteBatch) -> None:
            for block in new:
                batch.put(schema.pending_key(height, block.hash), block.encode())

        self._write(f"keeping {len(new)} pending block(s) at height {height}", fill)


def describe_error(error: plyvel.Error) -> str:
    """LevelDB's message for `error` as text (plyvel gives it as bytes)."""
    message = error.args[0] if error.args else error
    return message.decode(errors="replace") if isinstance(message, bytes) else str(message)
