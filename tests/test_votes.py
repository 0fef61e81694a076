"""The validators' vote record: what they attested survives a restart, and a conflicting vote is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p.votes import KEPT, VoteRecord, VoteRecordError

VALIDATOR, OTHER = b"v" * 32, b"w" * 32
PARENT = b"p" * 32
BLOCK_A, BLOCK_B = b"a" * 32, b"b" * 32


def test_a_recorded_attestation_survives_reopening_and_a_conflicting_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "votes"
    record = VoteRecord.open(path)
    assert record.attested_block(VALIDATOR, PARENT) is None
    record.record(VALIDATOR, PARENT, BLOCK_A)
    record.record(OTHER, PARENT, BLOCK_B)

    reopened = VoteRecord.open(path)  # what a restarted node reads
    assert reopened.attested_block(VALIDATOR, PARENT) == BLOCK_A
    assert reopened.attested_block(OTHER, PARENT) == BLOCK_B
    reopened.record(VALIDATOR, PARENT, BLOCK_A)  # the same vote again is fine
    with pytest.raises(ValueError, match="already attested"):
        reopened.record(VALIDATOR, PARENT, BLOCK_B)
    assert VoteRecord.open(path).attested_block(VALIDATOR, PARENT) == BLOCK_A
    assert not (tmp_path / "votes.tmp").exists()


def test_the_record_keeps_the_newest_parents(tmp_path: Path) -> None:
    record = VoteRecord.open(tmp_path / "votes")
    parents = [i.to_bytes(32, "big") for i in range(KEPT + 5)]
    for parent in parents:
        record.record(VALIDATOR, parent, BLOCK_A)
    reopened = VoteRecord.open(tmp_path / "votes")
    assert reopened.attested_block(VALIDATOR, parents[0]) is None
    assert all(reopened.attested_block(VALIDATOR, parent) == BLOCK_A for parent in parents[5:])


@pytest.mark.parametrize("content", [b"\xc1", b"\x91\x93\xc4\x01x", b"\x05"])
def test_an_unreadable_record_stops_the_validator_with_a_reason(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "votes").write_bytes(content)
    with pytest.raises(VoteRecordError, match="votes"):
        VoteRecord.open(tmp_path / "votes")
