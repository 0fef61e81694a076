"""Canonical encoding: exact round trips, one encoding per object, and decoders
that answer any bytes with DecodeError and nothing else."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.blocks import (
    MAX_BLOCK_OBJECTS,
    MAX_COMMITMENTS,
    MAX_EVIDENCE,
    MAX_NAMED_WEIGHTS_BYTES,
    MAX_REVEALED,
    MAX_REWARDS,
    MAX_TRAINING_PER_HEIGHT,
    MAX_WEIGHTS_BYTES,
    Block,
    DecidedBody,
    EquivocationEvidence,
    Header,
    HeldOutTest,
    RevealedSequence,
    Reward,
    TrainingVerdict,
    UpdateCommitment,
    decode_block,
)
from chain.crypto import Domain, devnet_key
from chain.encoding import (
    MAX_ARRAY_LENGTH,
    MAX_MESSAGE_BYTES,
    MAX_NESTING,
    MAX_OBJECTS,
    DecodeError,
    pack,
    scan,
    unpack,
)
from chain.state import decode_state_record
from chain.votes import (
    MAX_COMMIT_OBJECTS,
    MAX_COMMIT_SIGNATURES,
    MAX_MESSAGE_OBJECTS,
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
from chain.vrf import PROOF_BYTES
from consensus.decisions import apply_decided_block, get_validator_set, propose_decided_block
from p2p.voting_node import (
    ENTRY_OVERHEAD,
    MAX_DECIDED_OBJECTS,
    MAX_DECIDED_RESPONSE_BYTES,
    MAX_VOTING_MESSAGE_OBJECTS,
    decode_voting_message,
    encode_voting_message,
)
from p2p.wire import (
    MAX_ANNOUNCEMENT_OBJECTS,
    MAX_BLOCKS_PER_REQUEST,
    MAX_GOSSIP_BYTES,
    MAX_RESPONSE_BYTES,
    MAX_SMALL_OBJECTS,
    Announcement,
    Request,
    StatusMessage,
)
from tests.chain_builders import Scenario, certificate, devnet_test_shard


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    """Genesis, a training block, the decided block naming it (height 1), and height 2's
    decided block, which carries height 1's commit certificate and equivocation evidence."""
    scenario = Scenario.create(tmp_path_factory.mktemp("encoding"))
    genesis, state = scenario.genesis()
    keys, chain = scenario.validators, scenario.chain
    training = scenario.valid_training_block(genesis, state)
    first = propose_decided_block(
        chain, genesis, state, keys[0], [training], None, None, (), devnet_test_shard(keys[0].public_key)
    )
    first_state = apply_decided_block(state, genesis, first, {training.hash: training}, None, chain)
    commit = certificate(scenario.node, first, keys[:3])
    votes = [
        sign_vote(keys[3], chain.domain, Vote(VoteKind.PREVOTE, 2, 0, block_hash, 1, keys[3].public_key))
        for block_hash in (first.hash, None)
    ]
    evidence = (EquivocationEvidence(votes[0], votes[1]),)
    validators = get_validator_set(state, scenario.node.genesis)
    second = propose_decided_block(chain, first, first_state, keys[1], [], commit, validators, evidence)
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
    with pytest.raises(DecodeError, match="maps are not allowed"):
        decode_block(msgpack.packb({"header": 1}))
    with pytest.raises(DecodeError, match="expected an array"):
        decode_block(msgpack.packb(7))
    with pytest.raises(DecodeError, match="expected an integer"):
        decode_block(msgpack.packb([["potchain-devnet-1", 1.5, b"", 0, 0, b"", b"", b""], [], b""]))
    with pytest.raises(DecodeError, match="bytes, limit"):
        unpack(b"\x00" * 100, "thing", max_bytes=10)


def test_a_decided_body_applies_a_list_of_32_byte_hashes(samples: dict[str, bytes]) -> None:
    """`applied` is an array of at most MAX_TRAINING_PER_HEIGHT training block hashes (32 bytes
    each), and the held-out test carries its loss after: an entry of another length or type, one
    entry too many, the former single binary, or a test without loss_after is refused."""
    header, body, signature = msgpack.unpackb(samples["decided"])
    decided = decode_block(samples["decided"])
    assert isinstance(decided.body, DecidedBody) and decided.body.test is not None
    assert body[-1] == list(decided.body.applied) and body[1][-1] == decided.body.test.loss_after

    def decode_with(applied: Any = None, test: Any = None) -> Block:
        fields = [*body[:-1], body[-1] if applied is None else applied]
        if test is not None:
            fields[1] = test
        return decode_block(pack([header, fields, signature]))

    two = [bytes(32), bytes([1]) * 32]
    assert decode_with(two).body == dataclasses.replace(decided.body, applied=tuple(two))
    assert decode_with([]).body == dataclasses.replace(decided.body, applied=())
    for applied, reason in [
        ([bytes(31)], r"applied: want 32-byte hashes, got b'\\x00"),
        ([bytes(32), bytes(33)], "applied: want 32-byte hashes"),
        ([b""], "applied: want 32-byte hashes"),
        ([7], "applied: want 32-byte hashes, got 7"),
        ([bytes(32)] * (MAX_TRAINING_PER_HEIGHT + 1), f"applied: {MAX_TRAINING_PER_HEIGHT + 1} items, limit"),
        (bytes(32), "applied: expected an array, got bytes"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            decode_with(applied)
    with pytest.raises(DecodeError, match="held-out test"):
        decode_with(test=body[1][:3])


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
    hashes, accounts, difficulty, height, _, _, _ = decode_state_record(samples["state"])
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


# --- The object budget ----------------------------------------------------------------


def nested_empty_arrays(outer: int) -> bytes:
    """An array of `outer` arrays of 4096 empty arrays: one byte an object on the wire,
    about 64 bytes each as Python lists."""
    return b"\xdc" + outer.to_bytes(2, "big") + (b"\xdc\x10\x00" + b"\x90" * 4096) * outer


def many_small_integers(outer: int, item: bytes) -> bytes:
    """An array of `outer` arrays of 4096 copies of the integer encoded as `item`."""
    return b"\xdc" + outer.to_bytes(2, "big") + (b"\xdc\x10\x00" + item * 4096) * outer


def largest_decided_body() -> DecidedBody:
    """A decided body at every array limit (field values need not be valid, only well-typed)."""
    vote = Vote(VoteKind.PREVOTE, 2, 0, bytes(32), 1, bytes(32), bytes(64))
    commit = Commit(2, 0, bytes(32), tuple((i.to_bytes(32, "big"), 1, bytes(64)) for i in range(MAX_COMMIT_SIGNATURES)))
    test = HeldOutTest(bytes(PROOF_BYTES), 1, (RevealedSequence(0, b"a", bytes(32)),) * MAX_REVEALED)
    commitment = UpdateCommitment(2, bytes(32), bytes(32), bytes(64))
    return DecidedBody(
        (TrainingVerdict(bytes(32), 0),) * MAX_TRAINING_PER_HEIGHT,
        test,
        (commitment,) * MAX_COMMITMENTS,
        commit,
        (EquivocationEvidence(vote, vote),) * MAX_EVIDENCE,
        (Reward(bytes(32), 1),) * MAX_REWARDS,
        (bytes(32),) * MAX_TRAINING_PER_HEIGHT,
    )


def test_the_largest_objects_fit_their_budgets(samples: dict[str, bytes]) -> None:
    decided = decode_block(samples["decided_with_commit"])
    body = largest_decided_body()
    largest = Block(decided.header, body, decided.signature).encode()
    assert scan(largest) == 26_447 <= MAX_BLOCK_OBJECTS
    assert decode_block(largest).body == body
    assert body.last_commit is not None
    commit = body.last_commit.encode()
    assert scan(commit) == MAX_COMMIT_OBJECTS and decode_commit(commit) == body.last_commit
    assert scan(encode_voting_message(body.last_commit)) == MAX_VOTING_MESSAGE_OBJECTS
    # The largest commit that fits a gossip message decodes as a voting message.
    gossiped = Commit(2, 0, bytes(32), body.last_commit.signatures[:600])
    assert len(encode_voting_message(gossiped)) <= MAX_GOSSIP_BYTES
    assert decode_voting_message(encode_voting_message(gossiped)) == gossiped
    training = decode_block(samples["training"])
    assert (
        scan(samples["training"]) == 18
        and Announcement.decode(Announcement.of(training).encode()).header == training.header
    )
    # A state record at its array limits (4096 slices, 4096 accounts) is within the default budget.
    accounts = [[i.to_bytes(32, "big"), 1, 1] for i in range(MAX_ARRAY_LENGTH)]
    record = pack([[bytes(32)] * MAX_ARRAY_LENGTH, accounts, 1, 0, bytes(32), 0, []])
    assert scan(record) == 20_488 <= MAX_OBJECTS and len(decode_state_record(record)[1]) == MAX_ARRAY_LENGTH


def test_the_budgets_are_the_documented_ones_and_fit_the_small_messages() -> None:
    """docs/spec.md, section 6, names each budget."""
    budgets = (MAX_BLOCK_OBJECTS, MAX_COMMIT_OBJECTS, MAX_DECIDED_OBJECTS, MAX_VOTING_MESSAGE_OBJECTS)
    assert budgets == (32_768, 4_101, 257, 4_103)
    assert (MAX_MESSAGE_OBJECTS, MAX_ANNOUNCEMENT_OBJECTS, MAX_SMALL_OBJECTS, MAX_OBJECTS) == (16, 16, 8, 65_536)
    key = devnet_key("validator-0")
    domain = Domain("potchain-devnet-1", bytes(32))
    vote = sign_vote(key, domain, Vote(VoteKind.PRECOMMIT, 3, 1, bytes(32), 5, key.public_key))
    proposal = sign_proposal(key, domain, Proposal(3, 2, bytes(32), 1, key.public_key))
    assert scan(vote.encode()) == 8 and scan(proposal.encode()) == 7
    assert scan(StatusMessage(bytes(32), 1, bytes(32), 1, bytes(32)).encode()) == 6
    assert scan(Request("decided", (1, 32)).encode()) == 4 and scan(pack([0, 1 << 20])) == 3


def test_a_decided_answer_of_32_heights_decodes_within_its_budget(samples: dict[str, bytes]) -> None:
    entry = [samples["decided_with_commit"], samples["commit"], [samples["training"]] * MAX_TRAINING_PER_HEIGHT]
    answer = pack([entry] * MAX_BLOCKS_PER_REQUEST)
    assert scan(answer) == MAX_DECIDED_OBJECTS
    entries = unpack(answer, "decided", MAX_RESPONSE_BYTES, MAX_DECIDED_OBJECTS)
    assert [decode_block(e[0]).hash for e in entries] == [decode_block(samples["decided_with_commit"]).hash] * 32
    # One more training block in one entry is over the budget.
    over = pack(
        [entry] * (MAX_BLOCKS_PER_REQUEST - 1) + [[*entry[:2], [samples["training"]] * (MAX_TRAINING_PER_HEIGHT + 1)]]
    )
    with pytest.raises(DecodeError, match=f"decided: more than {MAX_DECIDED_OBJECTS} objects"):
        unpack(over, "decided", MAX_RESPONSE_BYTES, MAX_DECIDED_OBJECTS)


def test_the_wire_limits_are_consistent(samples: dict[str, bytes]) -> None:
    # A training block with the largest update is one message.
    training = decode_block(samples["training"])
    largest = pack([training.header.fields(), [0, bytes(MAX_WEIGHTS_BYTES), 0, 0, 0, bytes(32)], bytes(64)])
    assert len(largest) <= MAX_MESSAGE_BYTES and scan(largest) <= MAX_BLOCK_OBJECTS
    # A decided answer always holds one height at its largest: its block, certificate and training blocks.
    one_height = (
        MAX_MESSAGE_BYTES + (1 << 20) + MAX_NAMED_WEIGHTS_BYTES + MAX_TRAINING_PER_HEIGHT * 4096 + ENTRY_OVERHEAD
    )
    assert one_height <= MAX_DECIDED_RESPONSE_BYTES < MAX_RESPONSE_BYTES
    assert MAX_GOSSIP_BYTES <= 1 << 20  # a voting message is smaller than the largest commit a decoder takes


BOMBS = {
    "nested empty arrays": nested_empty_arrays(4000),
    "small integers": many_small_integers(4000, b"\x01"),
    "16-bit integers": many_small_integers(1360, b"\xcd\x01\x00"),
}
DECODERS_WITH_BUDGETS = {
    "block": (lambda data: decode_block(data), MAX_BLOCK_OBJECTS),
    "default": (lambda data: unpack(data, "thing"), MAX_OBJECTS),
    "decided answer": (
        lambda data: unpack(data, "decided", MAX_RESPONSE_BYTES, MAX_DECIDED_OBJECTS),
        MAX_DECIDED_OBJECTS,
    ),
}


@pytest.mark.parametrize("bomb", BOMBS, ids=list(BOMBS))
@pytest.mark.parametrize("decoder", DECODERS_WITH_BUDGETS, ids=list(DECODERS_WITH_BUDGETS))
def test_object_bombs_are_rejected_before_msgpack_allocates(bomb: str, decoder: str) -> None:
    """16 MiB of nested empty arrays or small integers would be 1-2 GiB of Python objects;
    the scan stops at the budget, within milliseconds, having allocated almost nothing."""
    data, (decode, budget) = BOMBS[bomb], DECODERS_WITH_BUDGETS[decoder]
    assert len(data) <= MAX_MESSAGE_BYTES and len(data) > 16_000_000
    started = time.perf_counter()
    with pytest.raises(DecodeError, match=f"more than {budget} objects, limit {budget}"):
        decode(data)
    assert time.perf_counter() - started < 1.0  # about 30 ms at the default budget on the 2-core machine
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000


def test_nesting_is_limited_without_recursion() -> None:
    assert unpack(b"\x91" * (MAX_NESTING - 1) + b"\x90", "thing") == eval("[" * MAX_NESTING + "]" * MAX_NESTING)
    with pytest.raises(DecodeError, match=f"thing: arrays nested more than {MAX_NESTING} deep"):
        unpack(b"\x91" * MAX_NESTING + b"\x90", "thing")
    with pytest.raises(DecodeError, match="nested more than"):
        decode_block(b"\x91" * 1_000_000 + b"\x90")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", r"malformed msgpack \(truncated", id="empty"),
        pytest.param(b"\xc1", r"malformed msgpack \(byte 0xc1 at 0 is no msgpack type", id="unused byte"),
        pytest.param(b"\xc4\x05abc", r"malformed msgpack \(truncated: 5 bytes, 7 needed", id="short bin"),
        pytest.param(b"\xc5\x01", r"malformed msgpack \(truncated", id="cut length"),
        pytest.param(
            b"\x92\x01", r"malformed msgpack \(truncated: an array of 2 items in the last 1 bytes", id="short array"
        ),
        pytest.param(b"\x90\x00", r"malformed msgpack \(1 bytes after the object", id="trailing"),
        pytest.param(b"\x81\x01\x02", "a map at byte 0: maps are not allowed", id="fixmap"),
        pytest.param(b"\x91\xde\x00\x00", "a map at byte 1: maps are not allowed", id="map16"),
        pytest.param(b"\xd4\x01\x00", "an ext type at byte 0: ext types are not allowed", id="fixext"),
        pytest.param(b"\xda\x01\x01" + b"a" * 257, "text of 257 bytes at byte 0, limit 256", id="long text"),
        pytest.param(b"\xdc\x10\x01" + b"\x00" * 4097, "an array of 4097 items, limit 4096", id="long array"),
    ],
)
def test_malformed_structures_are_rejected_with_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match="thing: " + reason):
        unpack(data, "thing")
