"""Writing a file so that a crash, a power cut or a full disk never leaves a torn one.

`write_atomically(path, data, mode)` writes `data` to a new temporary file in
the same directory (`tempfile.mkstemp`: a unique name per call, so two writers
never share one), sets its mode (`SECRET_MODE`, 0600, for keys and tokens),
writes, flushes and fsyncs it, renames it over `path` (`os.replace`, atomic on
POSIX), then fsyncs the directory so that the rename itself is durable. A kill
or a power cut at any moment leaves either the old file or the new one, never
a mix; a failed write (a full disk, say) removes its temporary file and raises
`OSError` naming `path`, and `path` is untouched.

A write killed before its rename leaves a temporary file named
`NAME.XXXXXXXX.tmp` beside `path` (`leftover_pattern`): it is never read as
the file, and `remove_leftovers(path)` deletes those of earlier writes (the
owner of a file calls it when it opens the file, before writing it again).

Every file the node writes outside its database goes through here: keys
(node, validator and miner), the RPC tokens, the signer record, node.json,
the miner's state and reports. This module lives in `chain/` because every
writer may import it (node.py, p2p/, sim/ and chain/ itself); `training/` must
not import `chain/`, so the miner hands its state's bytes to its caller.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path

SECRET_MODE = 0o600
"""Keys, tokens and the signer record: the owner alone reads them."""
PUBLIC_MODE = 0o644
"""Everything else: records anyone on the machine may read."""
TEMPORARY_SUFFIX = ".tmp"
"""The suffix of a write's temporary file (its prefix is the file's name and a dot)."""


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data`, atomically and durably (see the module docstring).

    Raises OSError naming `path` (and leaves `path` as it was) if any step fails."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data: got {type(data).__name__}, want bytes")
    if mode & ~0o777:
        raise ValueError(f"mode: got {mode:o}, want permission bits only (at most 777)")
    directory = path.parent
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=TEMPORARY_SUFFIX, dir=directory)
    except OSError as error:
        raise _naming(error, path) from error
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise _naming(error, path) from error
        raise
    try:
        fsync_directory(directory)
    except OSError as error:
        raise _naming(error, path) from error


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (fsync the directory itself)."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def leftover_pattern(path: Path) -> str:
    """The glob (in `path`'s directory) that matches temporary files of writes of `path`."""
    return f"{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}"


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temporary files that killed writes of `path` left behind; returns them.
    Call it only where no other write of `path` can be under way (when opening the file)."""
    removed = []
    for leftover in sorted(path.parent.glob(leftover_pattern(path))):
        if leftover.is_file() and leftover != path:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(leftover)
    return removed


def _naming(error: OSError, path: Path) -> OSError:
    """`error` again, with `path` as its file name (a full disk names the file it refused)."""
    if error.errno is None:
        return OSError(f"writing {path}: {error}")
    return OSError(error.errno, f"writing {path}: {error.strerror}")
