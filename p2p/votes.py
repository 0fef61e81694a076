"""A validator's record of what it signed, kept on disk: slashing protection.

Two attestations by one validator for different training blocks on one
parent are slashable (docs/spec.md, section 8). A node that attested, was
killed and restarted has forgotten what it attested, and the block it picks
after the restart may be a different one. So every attestation is recorded
here, synced to disk, before it is published; after a restart the validator
attests the recorded block again, or nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chain.encoding import DecodeError, Fields, pack, unpack

KEPT = 256
"""Records kept (the newest): far more parents than a restart can leave open."""


class VoteRecordError(ValueError):
    """The record file is unreadable: refuse to sign rather than risk a double vote."""


@dataclass
class VoteRecord:
    """(validator, parent) -> the training block it attested, persisted at `path`."""

    path: Path
    attested: dict[tuple[bytes, bytes], bytes] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> VoteRecord:
        record = cls(path)
        if not path.exists():
            return record
        try:
            for item in unpack(path.read_bytes(), "vote record", 1 << 20):
                f = Fields(item, "vote", ("validator", "parent", "training_block"))
                key = (f.binary("validator", 32), f.binary("parent", 32))
                record.attested[key] = f.binary("training_block", 32)
        except (DecodeError, TypeError) as error:
            raise VoteRecordError(
                f"{path}: {error} (remove it only if its validators have signed nothing since it was written)"
            ) from error
        return record

    def attested_block(self, validator: bytes, parent: bytes) -> bytes | None:
        """The training block this validator attested on `parent`, if any."""
        return self.attested.get((validator, parent))

    def record(self, validator: bytes, parent: bytes, training_block: bytes) -> None:
        """Record an attestation, durably, before it is signed and published.
        Raises ValueError if it conflicts with a recorded one."""
        known = self.attested.get((validator, parent))
        if known is not None and known != training_block:
            raise ValueError(f"validator {validator.hex()[:16]} already attested {known.hex()[:16]} on this parent")
        self.attested[(validator, parent)] = training_block
        while len(self.attested) > KEPT:
            del self.attested[next(iter(self.attested))]
        items = [[validator, parent, block] for (validator, parent), block in self.attested.items()]
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(pack(items))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
