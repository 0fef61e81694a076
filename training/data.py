"""The corpus: content-addressed chunks, splits and seeded batches.

The dataset manifest in genesis lists documents in order; each document has a
split (train, validation or test) and a list of chunks named by the SHA-256 of
their bytes. Chunk files live in the chunk directory as `<sha256>.xz`. A
split's text is its documents' bytes concatenated in manifest order.
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "validation", "test")


class ChunkError(ValueError):
    """A chunk is missing, unreadable, or does not match its hash."""


@dataclass(frozen=True)
class Document:
    """One whole work of the corpus; a document belongs to exactly one split."""

    name: str
    """Short identifier, e.g. "hamlet"."""
    split: str
    """"train", "validation" or "test"."""
    size: int
    """Length in bytes."""
    chunks: tuple[str, ...]
    """SHA-256 (hex) of each chunk, in order; all chunks but the last are full."""


@dataclass(frozen=True)
class DatasetManifest:
    """The corpus as pinned by genesis."""

    name: str
    """Human-readable corpus name."""
    chunk_size: int
    """Bytes per chunk (the last chunk of a document may be shorter)."""
    documents: tuple[Document, ...]
    """Every document, in canonical order."""

    def split_documents(self, split: str) -> list[Document]:
        return [document for document in self.documents if document.split == split]

    def split_size(self, split: str) -> int:
        return sum(document.size for document in self.split_documents(split))


def read_chunk(directory: Path, digest: str, label: str) -> bytes:
    """Read one chunk and check its SHA-256; `label` names it in errors."""
    path = directory / f"{digest}.xz"
    try:
        data = lzma.decompress(path.read_bytes())
    except FileNotFoundError:
        raise ChunkError(f"chunk {digest} ({label}): missing file {path}") from None
    except (lzma.LZMAError, OSError) as error:
        raise ChunkError(f"chunk {digest} ({label}): unreadable {path}: {error}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ChunkError(f"chunk {digest} ({label}): sha256 mismatch, got {got}")
    return data


def load_split(manifest: DatasetManifest, directory: Path, split: str) -> bytes:
    """The split's text, every chunk verified against its hash."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    parts: list[bytes] = []
    for document in manifest.split_documents(split):
        pieces = [
            read_chunk(directory, digest, f"{document.name} part {index + 1} of {len(document.chunks)}")
            for index, digest in enumerate(document.chunks)
        ]
        text = b"".join(pieces)
        if len(text) != document.size:
            raise ChunkError(f"document {document.name}: {len(text)} bytes, manifest says {document.size}")
        parts.append(text)
    return b"".join(parts)


def chunk_document(text: bytes, chunk_size: int) -> list[bytes]:
    return [text[start : start + chunk_size] for start in range(0, len(text), chunk_size)]


def batch_offsets(seed: bytes, sequences: int, span: int, text_size: int) -> list[int]:
    """Start offsets of `sequences` windows of `span` bytes in a text.

    offset_i = int(sha256(b"potchain/batch" || seed || i as 4 bytes)[:8]) mod (size - span + 1).
    """
    choices = text_size - span + 1
    if choices <= 0:
        raise ValueError(f"text of {text_size} bytes is shorter than one window of {span}")
    offsets = []
    for index in range(sequences):
        digest = hashlib.sha256(b"potchain/batch" + seed + index.to_bytes(4, "big")).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % choices)
    return offsets


def sample_batch(text: bytes, seed: bytes, sequences: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (sequences, length): byte windows and the next bytes."""
    offsets = batch_offsets(seed, sequences, length + 1, len(text))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    windows = torch.stack([data[start : start + length + 1] for start in offsets]).to(torch.int64)
    return windows[:, :-1], windows[:, 1:]


def batch_of_sequences(sequences: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (len(sequences), length) from sequences of length + 1 bytes
    (a held-out test's revealed sequences)."""
    windows = torch.frombuffer(bytearray(b"".join(sequences)), dtype=torch.uint8).to(torch.int64)
    windows = windows.view(len(sequences), -1)  # (sequences, length + 1)
    return windows[:, :-1], windows[:, 1:]


def seed_from_int(value: int) -> bytes:
    """The 32-byte seed for an integer seed (big-endian), as `potchain eval --seed` uses."""
    if not 0 <= value < 1 << 256:
        raise ValueError(f"seed {value} outside [0, 2**256)")
    return value.to_bytes(32, "big")
