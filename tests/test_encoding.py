"""Canonical encoding: exact round trips, one encoding per object, and decoders
that answer any bytes with DecodeError and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.blocks import Block, decode_attestation, decode_block
from chain.encoding import DecodeError, pack, unpack
from chain.state import decode_state_record
from tests.chain_builders import Scenario


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    scenario = Scenario.create(tmp_path_factory.mktemp("encoding"))
    genesis, state = scenario.node.checkpoint()
    training = scenario.valid_training_block(genesis, state)
    attestations = scenario.attestations(training, state)
    validation = scenario.valid_validation_block(training, state, attestations)
    yield {
        "genesis": genesis.encode(),
        "training": training.encode(),
        "validation": validation.encode(),
        "attestation": pack(attestations[0].fields()),
        "state": state.record(),
    }
    scenario.node.close()


def test_round_trips_are_exact(samples: dict[str, bytes]) -> None:
    for name in ("genesis", "training", "validation"):
        block = decode_block(samples[name])
        assert block.encode() == samples[name]
        assert isinstance(block, Block) and block.hash == decode_block(block.encode()).hash
    attestation = decode_attestation(samples["attestation"])
    assert pack(attestation.fields()) == samples["attestation"]
    assert decode_state_record(samples["state"])[2] == 1


def test_non_canonical_and_foreign_encodings_are_rejected(samples: dict[str, bytes]) -> None:
    value = msgpack.unpackb(samples["validation"])
    # The same value with an integer in a wider encoding than needed.
    wide = samples["validation"].replace(b"\x02", b"\xcd\x00\x02", 1)
    assert msgpack.unpackb(wide) == value
    with pytest.raises(DecodeError, match="not the canonical encoding"):
        decode_block(wide)
    with pytest.raises(DecodeError, match="ext"):
        unpack(msgpack.packb(msgpack.ExtType(1, b"x")), "thing")
    with pytest.raises(DecodeError, match="max_map_len"):
        decode_block(msgpack.packb({"header": 1}))
    with pytest.raises(DecodeError, match="expected an array"):
        decode_block(msgpack.packb(7))
    with pytest.raises(DecodeError, match="expected an integer"):
        decode_block(msgpack.packb([["potchain-devnet-1", 1.5, b"", 0, 0, b"", b"", b""], [], b""]))
    with pytest.raises(DecodeError, match="bytes, limit"):
        unpack(b"\x00" * 100, "thing", max_bytes=10)


def test_decoding_bombs_fail_before_allocation() -> None:
    # An array header claiming 2**32 - 1 items, and a bin header claiming 4 GiB.
    for bomb in (b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff" + b"x" * 10):
        with pytest.raises(DecodeError):
            decode_block(bomb)


DECODERS = [decode_block, decode_attestation, decode_state_record]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    for decoder in DECODERS:
        with contextlib.suppress(DecodeError):
            decoder(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["genesis", "validation", "attestation", "state"]), position=st.integers(0, 10**6),
       replacement=st.binary(min_size=1, max_size=8), cut=st.booleans())  # fmt: skip
def test_mutated_encodings_raise_only_decode_errors(
    samples: dict[str, bytes], name: str, position: int, replacement: bytes, cut: bool
) -> None:
    original = samples[name]
    index = position % len(original)
    mutated = original[:index] if cut else original[:index] + replacement + original[index + len(replacement) :]
    for decoder in DECODERS:
        with contextlib.suppress(DecodeError):
            decoder(mutated)


def test_state_record_fields(samples: dict[str, bytes]) -> None:
    hashes, accounts, difficulty, height, _, _ = decode_state_record(samples["state"])
    assert len(hashes) == 4 and len(accounts) == 4 and height == 0 and difficulty == 1
