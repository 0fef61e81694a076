"""Canonical encoding: exact round trips, one encoding per object, and decoders
that answer any bytes with DecodeError and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.blocks import Block, EquivocationEvidence, Header, decode_block
from chain.crypto import Domain, devnet_key
from chain.encoding import DecodeError, pack, unpack
from chain.state import decode_state_record
from chain.votes import (
    Commit,
    Proposal,
    Vote,
    VoteKind,
    decode_commit,
    decode_proposal,
    decode_vote,
    sign_proposal,
    sign_vote,
)
from consensus.decisions import apply_decided_block, get_validator_set, propose_decided_block
from tests.chain_builders import Scenario, certificate


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    """Genesis, a training block, the decided block naming it (height 1), and height 2's
    decided block, which carries height 1's commit certificate and equivocation evidence."""
    scenario = Scenario.create(tmp_path_factory.mktemp("encoding"))
    genesis, state = scenario.genesis()
    keys, chain = scenario.validators, scenario.chain
    training = scenario.valid_training_block(genesis, state)
    first = propose_decided_block(chain, genesis, state, keys[0], training, None, None, ())
    first_state = apply_decided_block(state, genesis, first, {training.hash: training}, None, chain)
    commit = certificate(scenario.node, first, keys[:3])
    votes = [
        sign_vote(keys[3], chain.domain, Vote(VoteKind.PREVOTE, 2, 0, block_hash, 1, keys[3].public_key))
        for block_hash in (first.hash, None)
    ]
    evidence = (EquivocationEvidence(votes[0], votes[1]),)
    validators = get_validator_set(state, scenario.node.genesis)
    second = propose_decided_block(chain, first, first_state, keys[1], None, commit, validators, evidence)
    yield {
        "genesis": genesis.encode(),
        "training": training.encode(),
        "decided": first.encode(),
        "decided_with_commit": second.encode(),
        "commit": commit.encode(),
        "state": state.record(),
    }
    scenario.node.close()


BLOCKS = ("genesis", "training", "decided", "decided_with_commit")


def test_round_trips_are_exact(samples: dict[str, bytes]) -> None:
    for name in BLOCKS:
        block = decode_block(samples[name])
        assert block.encode() == samples[name]
        assert isinstance(block, Block) and block.hash == decode_block(block.encode()).hash
    assert decode_commit(samples["commit"]).encode() == samples["commit"]
    assert decode_state_record(samples["state"])[2] == 1


def test_a_header_of_the_retired_kind_2_does_not_decode(samples: dict[str, bytes]) -> None:
    """Kind 2 was the attestation finality's validation block: no block, header or announcement of it decodes."""
    header, body, signature = msgpack.unpackb(samples["decided"])
    assert header[3] == 3
    retired = [*header[:3], 2, *header[4:]]
    with pytest.raises(DecodeError, match=r"header: kind 2 is retired \(.*validation block"):
        decode_block(pack([retired, body, signature]))
    with pytest.raises(DecodeError, match="header: kind 2 is retired"):
        decode_block(pack([retired, [[], [], []], signature]))  # with that version's (empty) validation body
    with pytest.raises(DecodeError, match="header: kind 2 is retired"):
        Header.from_fields(retired)
    with pytest.raises(DecodeError, match="kind"):
        decode_block(pack([[*header[:3], 4, *header[4:]], body, signature]))


def test_non_canonical_and_foreign_encodings_are_rejected(samples: dict[str, bytes]) -> None:
    encoded = samples["decided_with_commit"]
    value = msgpack.unpackb(encoded)
    # The same value with an integer (the height, 2) in a wider encoding than needed.
    prefix = b"\x93\x98" + msgpack.packb("potchain-devnet-1")
    assert encoded.startswith(prefix + b"\x02")
    wide = prefix + b"\xcd\x00\x02" + encoded[len(prefix) + 1 :]
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


DECODERS = [decode_block, decode_state_record, decode_vote, decode_proposal, decode_commit]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    for decoder in DECODERS:
        with contextlib.suppress(DecodeError):
            decoder(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["genesis", "decided", "decided_with_commit", "commit", "state"]),
       position=st.integers(0, 10**6),
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


def test_voting_messages_round_trip_and_signatures_bind_every_field() -> None:
    domain = Domain("potchain-devnet-1", bytes(32))
    key, other = devnet_key("validator-0"), devnet_key("validator-1")
    block = bytes(range(32))
    prevote = sign_vote(key, domain, Vote(VoteKind.PREVOTE, 3, 1, block, 1_700_000_000, key.public_key))
    nil = sign_vote(key, domain, Vote(VoteKind.PRECOMMIT, 3, 1, None, 1_700_000_000, key.public_key))
    proposal = sign_proposal(key, domain, Proposal(3, 2, block, 1, key.public_key))
    for vote in (prevote, nil):
        assert decode_vote(vote.encode()) == vote and vote.is_signed_by_validator(domain)
    assert decode_proposal(proposal.encode()) == proposal and proposal.is_signed_by_proposer(domain)
    # A prevote's signature is not a precommit's; another key, round or domain fails.
    assert not Vote(VoteKind.PRECOMMIT, 3, 1, block, 1_700_000_000, key.public_key, prevote.signature) \
        .is_signed_by_validator(domain)  # fmt: skip
    assert not Vote(VoteKind.PREVOTE, 3, 2, block, 1_700_000_000, key.public_key, prevote.signature) \
        .is_signed_by_validator(domain)  # fmt: skip
    assert not Vote(VoteKind.PREVOTE, 3, 1, block, 1_700_000_000, other.public_key, prevote.signature) \
        .is_signed_by_validator(domain)  # fmt: skip
    assert not prevote.is_signed_by_validator(Domain("potchain-devnet-1", bytes([1]) * 32))
    precommits = [
        sign_vote(k, domain, Vote(VoteKind.PRECOMMIT, 3, 1, block, 1_700_000_000 + i, k.public_key))
        for i, k in enumerate((other, key))
    ]
    commit = Commit.of(precommits)
    assert decode_commit(commit.encode()) == commit
    assert sorted(commit.precommits(), key=lambda v: v.validator) == sorted(precommits, key=lambda v: v.validator)
    assert all(vote.is_signed_by_validator(domain) for vote in commit.precommits())


def test_malformed_voting_messages_are_rejected_with_their_reason() -> None:
    vote = Vote(VoteKind.PREVOTE, 3, 1, bytes(32), 5, bytes(32), bytes(64))
    with pytest.raises(DecodeError, match="block_hash: 5 bytes"):
        decode_vote(pack([1, 3, 1, b"short", 5, bytes(32), bytes(64)]))
    with pytest.raises(DecodeError, match="kind"):
        decode_vote(pack([3, *vote.fields()[1:]]))
    with pytest.raises(DecodeError, match="valid_round: 2 is not below the round 2"):
        decode_proposal(pack([3, 2, bytes(32), 2, bytes(32), bytes(64)]))
    with pytest.raises(DecodeError, match="valid_round: -2"):
        decode_proposal(pack([3, 2, bytes(32), -2, bytes(32), bytes(64)]))
    with pytest.raises(DecodeError, match="height: 0"):
        decode_vote(pack([1, 0, *vote.fields()[2:]]))
