"""The signer record: a validator's saved signer state survives restarts and
SIGKILL, and neither a restart nor a faulty caller makes it sign a message
that conflicts with one it signed before."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from chain.encoding import pack
from chain.votes import Proposal, Vote, VoteKind
from consensus.voting import (
    Action,
    Broadcast,
    CheckBlock,
    Decide,
    HeightVoting,
    ProposeValue,
    ScheduleTimeout,
    SignerState,
    Step,
    Timeout,
    TimeoutParameters,
    ValidatorSet,
)
from p2p.signer import (
    FORMAT_VERSION,
    ConflictingSignature,
    SignerError,
    SignerRecord,
    SignerRecordError,
    check_signable,
    check_successor,
    decode_signer_state,
    encode_record,
    encode_signer_state,
    message_step,
    signer_state_fields,
)

ME, OTHER = b"\x01" * 32, b"\x02" * 32
BLOCK_A, BLOCK_B, BLOCK_C = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
SIGNATURE = b"\x55" * 64
ROOT = Path(__file__).resolve().parent.parent


def prevote(round: int, block: bytes | None, height: int = 5, validator: bytes = ME, timestamp: int = 100) -> Vote:
    return Vote(VoteKind.PREVOTE, height, round, block, timestamp, validator)


def precommit(round: int, block: bytes | None, height: int = 5, validator: bytes = ME, timestamp: int = 100) -> Vote:
    return Vote(VoteKind.PRECOMMIT, height, round, block, timestamp, validator)


def proposal(round: int, block: bytes, valid_round: int = -1, height: int = 5, proposer: bytes = ME) -> Proposal:
    return Proposal(height, round, block, valid_round, proposer)


def state_at(
    round: int,
    step: Step,
    sent: tuple[Proposal | Vote, ...],
    lock: tuple[bytes | None, int] = (None, -1),
    valid: tuple[bytes | None, int] = (None, -1),
    height: int = 5,
) -> SignerState:
    return SignerState(height, round, step, lock[0], lock[1], valid[0], valid[1], sent)


SAVED = state_at(
    2,
    Step.PREVOTE,
    (
        proposal(0, BLOCK_A),
        prevote(0, BLOCK_A),
        precommit(0, BLOCK_A),
        prevote(1, None),
        precommit(1, None),
        proposal(2, BLOCK_A, valid_round=0),
        prevote(2, BLOCK_A),
    ),
    lock=(BLOCK_A, 0),
    valid=(BLOCK_A, 0),
)
"""Height 5: locked on A in round 0, nil in round 1, re-proposed A in round 2 and prevoted it."""


# --- Round trips ----------------------------------------------------------------


def test_saved_states_read_back_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "signer"
    record = SignerRecord.open(path)
    assert record.load(ME) is None and record.validators() == ()
    fresh = state_at(0, Step.PROPOSE, (), height=1)
    nil_only = state_at(3, Step.PRECOMMIT, (prevote(3, None, validator=OTHER), precommit(3, None, validator=OTHER)))
    record.save(ME, SAVED)
    record.save(OTHER, nil_only)
    record.save(b"\x03" * 32, fresh)

    reopened = SignerRecord.open(path)  # what a restarted node reads
    assert reopened.load(ME) == SAVED
    assert reopened.load(OTHER) == nil_only
    assert reopened.load(b"\x03" * 32) == fresh
    assert reopened.load(b"\x04" * 32) is None
    assert reopened.validators() == (ME, OTHER, b"\x03" * 32)
    assert decode_signer_state(encode_signer_state(SAVED)) == SAVED
    assert signer_state_fields(SAVED)[2] == int(Step.PREVOTE) and signer_state_fields(fresh)[3] == b""


def test_signed_messages_are_kept_unsigned(tmp_path: Path) -> None:
    record = SignerRecord.open(tmp_path / "signer")
    signed = replace(SAVED, sent=tuple(replace(message, signature=SIGNATURE) for message in SAVED.sent))
    record.save(ME, signed)
    assert record.load(ME) == SAVED
    assert SignerRecord.open(tmp_path / "signer").load(ME) == SAVED


def test_saving_the_saved_state_again_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "signer"
    record = SignerRecord.open(path)
    record.save(ME, SAVED)
    inode = path.stat().st_ino
    record.save(ME, SAVED)
    record.save_before_signing(ME, SAVED, SAVED.sent[0])  # a restarted machine re-sending what it signed
    assert path.stat().st_ino == inode  # each write replaces the file with a new one


# --- check_signable ---------------------------------------------------------------

REFUSED = [
    pytest.param(prevote(2, BLOCK_B), "conflicts with prevote at height 5 round 2", id="prevote another block"),
    pytest.param(prevote(2, None), "conflicts with", id="prevote nil after a block"),
    pytest.param(prevote(1, BLOCK_A), "conflicts with prevote at height 5 round 1 for nil", id="block after nil"),
    pytest.param(precommit(0, None), "conflicts with precommit", id="precommit nil after a block"),
    pytest.param(proposal(0, BLOCK_B), "conflicts with proposal", id="propose another block"),
    pytest.param(proposal(2, BLOCK_A, valid_round=1), "conflicts with proposal", id="another valid round"),
    pytest.param(prevote(2, BLOCK_A, timestamp=101), "differs only in its timestamp", id="another timestamp"),
    pytest.param(prevote(4, BLOCK_A, height=4), "below the saved height 5", id="lower height"),
    pytest.param(precommit(1, BLOCK_A, height=4), "below the saved height 5", id="lower height, new round"),
    pytest.param(precommit(0, BLOCK_B), "conflicts with precommit", id="precommit another block"),
]


def test_check_signable_refuses_a_round_or_step_already_left() -> None:
    # A message for a round below the saved one, even of a kind not sent in it.
    behind = state_at(4, Step.PROPOSE, (prevote(1, None), precommit(1, None)))
    with pytest.raises(ConflictingSignature, match="below the saved round 4"):
        check_signable(behind, prevote(3, BLOCK_A))
    with pytest.raises(ConflictingSignature, match="below the saved round 4"):
        check_signable(behind, proposal(2, BLOCK_A))
    # In the saved round: a proposal or prevote once past PROPOSE, a precommit once at PRECOMMIT.
    prevoted = state_at(4, Step.PREVOTE, ())
    with pytest.raises(ConflictingSignature, match="already reached step PREVOTE in round 4"):
        check_signable(prevoted, prevote(4, BLOCK_A))
    with pytest.raises(ConflictingSignature, match="already reached step PREVOTE"):
        check_signable(prevoted, proposal(4, BLOCK_A))
    precommitted = state_at(4, Step.PRECOMMIT, ())
    with pytest.raises(ConflictingSignature, match="already reached step PRECOMMIT"):
        check_signable(precommitted, precommit(4, None))
    with pytest.raises(ConflictingSignature, match="already reached step PRECOMMIT"):
        check_signable(precommitted, prevote(4, None))
    # Another validator's message is a caller's mistake, said as such.
    with pytest.raises(SignerError, match="another validator"):
        check_signable(SAVED, prevote(9, BLOCK_A, validator=OTHER))


@pytest.mark.parametrize(("message", "reason"), REFUSED)
def test_check_signable_refuses_a_message_that_conflicts_with_one_sent(message: Proposal | Vote, reason: str) -> None:
    with pytest.raises(ConflictingSignature, match=reason):
        check_signable(SAVED, message)


@pytest.mark.parametrize(
    "message",
    [
        *SAVED.sent,  # signing exactly what was signed before (a restarted machine re-sends it)
        precommit(2, BLOCK_A),  # the saved round's next step
        precommit(2, None),
        prevote(3, BLOCK_B),  # a later round
        proposal(7, BLOCK_C, valid_round=2),
        prevote(0, BLOCK_B, height=6),  # a later height
        proposal(0, BLOCK_C, height=6),
    ],
    ids=repr,
)
def test_check_signable_allows_identical_re_signing_and_progress(message: Proposal | Vote) -> None:
    check_signable(SAVED, message)
    check_signable(None, message)  # nothing saved: nothing to conflict with


def test_check_signable_allows_every_message_of_the_round_from_its_start() -> None:
    start = state_at(3, Step.PROPOSE, ())
    for message in (proposal(3, BLOCK_A), prevote(3, BLOCK_A), precommit(3, BLOCK_A)):
        check_signable(start, message)
    check_signable(state_at(3, Step.PREVOTE, (prevote(3, BLOCK_A),)), precommit(3, None))


def test_message_steps() -> None:
    assert [message_step(m) for m in (proposal(0, BLOCK_A), prevote(0, None), precommit(0, None))] == [
        Step.PROPOSE,
        Step.PREVOTE,
        Step.PRECOMMIT,
    ]


# --- Saving only what may follow ------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        pytest.param(replace(SAVED, height=4, sent=()), "below the saved height 5", id="lower height"),
        pytest.param(replace(SAVED, round=3, step=Step.PROPOSE, sent=SAVED.sent[:-1]), "forgets", id="forgets"),
        pytest.param(replace(SAVED, step=Step.PROPOSE), "behind the saved round 2 step PREVOTE", id="lower step"),
        pytest.param(
            replace(SAVED, round=1, step=Step.PRECOMMIT, sent=SAVED.sent[:5], valid_round=0), "behind", id="round"
        ),
        pytest.param(replace(SAVED, locked_value=None, locked_round=-1), "replaces the saved lock", id="unlocks"),
        pytest.param(
            replace(SAVED, round=3, step=Step.PREVOTE, sent=(*SAVED.sent, prevote(3, BLOCK_B), prevote(2, BLOCK_B))),
            "sent prevote at height 5 round 2",
            id="conflicting new message",
        ),
        pytest.param(
            replace(SAVED, step=Step.PRECOMMIT, sent=(*SAVED.sent, proposal(1, BLOCK_C, valid_round=0))),
            "below the saved round 2",
            id="new message in an old round",
        ),
        pytest.param(replace(SAVED, sent=(*SAVED.sent, prevote(2, None, height=6))), "not at height 5", id="height"),
        pytest.param(replace(SAVED, sent=(*SAVED.sent, prevote(3, None))), "up to round 2", id="future message"),
        pytest.param(replace(SAVED, locked_round=-1), "locked value", id="lock without round"),
        pytest.param(replace(SAVED, valid_round=7), "past the round", id="valid round ahead"),
        pytest.param(replace(SAVED, sent=(prevote(2, None, validator=OTHER),)), "signed by", id="another signer"),
    ],
)
def test_save_refuses_a_state_that_goes_back_on_what_was_signed(
    tmp_path: Path, state: SignerState, reason: str
) -> None:
    path = tmp_path / "signer"
    record = SignerRecord.open(path)
    record.save(ME, SAVED)
    before = path.read_bytes()
    with pytest.raises(SignerError, match=reason):
        record.save(ME, state)
    assert path.read_bytes() == before and record.load(ME) == SAVED
    assert SignerRecord.open(path).load(ME) == SAVED


def test_save_accepts_a_later_round_and_a_later_height(tmp_path: Path) -> None:
    record = SignerRecord.open(tmp_path / "signer")
    record.save(ME, SAVED)
    next_round = replace(SAVED, round=3, step=Step.PREVOTE, sent=(*SAVED.sent, prevote(3, BLOCK_A)))
    record.save(ME, next_round)
    check_successor(next_round, state_at(0, Step.PROPOSE, (), height=6))
    next_height = state_at(0, Step.PREVOTE, (prevote(0, BLOCK_B, height=6),), height=6)
    record.save(ME, next_height)
    assert SignerRecord.open(tmp_path / "signer").load(ME) == next_height
    with pytest.raises(ConflictingSignature, match="below the saved height 6"):
        record.save_before_signing(ME, next_round, next_round.sent[-1])


def test_save_before_signing_wants_the_message_in_the_state(tmp_path: Path) -> None:
    record = SignerRecord.open(tmp_path / "signer")
    with pytest.raises(SignerError, match="not in the state to save"):
        record.save_before_signing(ME, SAVED, precommit(2, BLOCK_A))
    with pytest.raises(SignerError, match="another key"):
        record.save_before_signing(OTHER, SAVED, SAVED.sent[0])
    assert not (tmp_path / "signer").exists()
    record.save_before_signing(ME, SAVED, replace(SAVED.sent[1], signature=SIGNATURE))  # signed or not: same message
    assert record.load(ME) == SAVED


# --- Unreadable records -------------------------------------------------------------


def _record_bytes(*entries: list[object], version: int = FORMAT_VERSION) -> bytes:
    return pack([version, list(entries)])


CORRUPT = [
    pytest.param(b"", "malformed msgpack", id="empty"),
    pytest.param(b"\xc1", "malformed msgpack", id="garbage"),
    pytest.param(b"\x05", "expected an array", id="an integer"),
    pytest.param(encode_record({ME: SAVED})[:-7], "malformed msgpack", id="truncated"),
    pytest.param(encode_record({ME: SAVED}) + b"\x00", "malformed msgpack", id="trailing bytes"),
    pytest.param(_record_bytes(version=2), "format version 2", id="another version"),
    pytest.param(_record_bytes([ME, signer_state_fields(SAVED)[:-1]]), "7 fields, want 8", id="short state"),
    pytest.param(
        _record_bytes([OTHER, signer_state_fields(state_at(0, Step.PROPOSE, ()))], [ME, signer_state_fields(SAVED)]),
        "out of order",
        id="out of order",
    ),
    pytest.param(_record_bytes([OTHER, signer_state_fields(SAVED)]), "signed by", id="another validator's state"),
    pytest.param(
        _record_bytes([ME, [*signer_state_fields(SAVED)[:7], [[9, []]]]]),
        r"type: 9 outside \[5, 7\]",
        id="unknown message type",
    ),
    pytest.param(
        _record_bytes([ME, [*signer_state_fields(SAVED)[:7], [[6, precommit(0, None).unsigned_fields()]]]]),
        "type 6 holds a vote of kind 2",
        id="precommit as a prevote",
    ),
    pytest.param(
        _record_bytes([ME, [*signer_state_fields(SAVED)[:3], b"\x01" * 5, *signer_state_fields(SAVED)[4:]]]),
        "locked_value: 5 bytes",
        id="short block hash",
    ),
    pytest.param(
        _record_bytes([ME, [*signer_state_fields(SAVED)[:2], 3, *signer_state_fields(SAVED)[3:]]]),
        "step: 3 outside",
        id="unknown step",
    ),
]


@pytest.mark.parametrize(("content", "reason"), CORRUPT)
def test_an_unreadable_record_stops_the_validators_with_a_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "signer"
    path.write_bytes(content)
    with pytest.raises(SignerRecordError, match=reason) as raised:
        SignerRecord.open(path)
    message = str(raised.value)
    assert message.startswith(str(path)) and "remove it only if none of its validators has signed" in message


def test_a_record_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "signer").mkdir()
    with pytest.raises(SignerRecordError, match="cannot read the signer record"):
        SignerRecord.open(tmp_path / "signer")


# --- Temporary files and threads -------------------------------------------------------


def growing_state(index: int, validator: bytes = ME, rounds_per_height: int = 100) -> SignerState:
    """The index-th of a sequence of states each of which may follow the one before:
    nil prevotes and precommits round after round, height after height."""
    height, round = 1 + index // rounds_per_height, index % rounds_per_height
    sent: list[Proposal | Vote] = []
    for earlier in range(round + 1):
        sent += [prevote(earlier, None, height, validator), precommit(earlier, None, height, validator)]
    return state_at(round, Step.PRECOMMIT, tuple(sent), height=height)


def index_of(state: SignerState, rounds_per_height: int = 100) -> int:
    return (state.height - 1) * rounds_per_height + state.round


def test_saves_leave_no_temporary_files_and_opening_removes_a_killed_saves_leftovers(tmp_path: Path) -> None:
    record = SignerRecord.open(tmp_path / "signer")
    for index in range(5):
        record.save(ME, growing_state(index))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer"]
    (tmp_path / "signer.k2x9q1zz.tmp").write_bytes(b"\x93partial")  # what a save killed mid-write leaves
    (tmp_path / "signer-notes.txt").write_bytes(b"not ours")
    assert SignerRecord.open(tmp_path / "signer").load(ME) == growing_state(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer", "signer-notes.txt"]


def test_a_state_too_large_to_read_back_is_refused_before_it_is_written(tmp_path: Path) -> None:
    record = SignerRecord.open(tmp_path / "signer")
    record.save(ME, growing_state(2000, rounds_per_height=10_000))
    with pytest.raises(SignerError, match=r"would not read back .*4098 messages sent at height 1, limit 4096"):
        record.save(ME, growing_state(2048, rounds_per_height=10_000))
    assert SignerRecord.open(tmp_path / "signer").load(ME) == growing_state(2000, rounds_per_height=10_000)


def test_concurrent_saves_never_race(tmp_path: Path) -> None:
    """Each thread saves its own validator's growing states on one record; no
    save fails, and the file ends with every validator's last state."""
    record = SignerRecord.open(tmp_path / "signer")
    validators = [bytes([index + 1]) * 32 for index in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(validators))

    def saver(validator: bytes) -> None:
        try:
            barrier.wait()
            for index in range(12):
                record.save(validator, growing_state(index, validator))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=saver, args=(validator,)) for validator in validators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    reopened = SignerRecord.open(tmp_path / "signer")
    assert all(reopened.load(validator) == growing_state(11, validator) for validator in validators)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer"]


# --- SIGKILL ---------------------------------------------------------------------------

SAVER = """
import sys
from pathlib import Path
from p2p.signer import SignerRecord
from tests.test_signer import growing_state, index_of
record = SignerRecord.open(Path(sys.argv[1]))
saved = record.load(bytes(32))
index = 0 if saved is None else index_of(saved) + 1
print("ready", flush=True)
while True:
    record.save(bytes(32), growing_state(index, bytes(32)))
    print(index, flush=True)
    index += 1
"""


@pytest.mark.slow
def test_sigkill_during_saves_leaves_the_last_acknowledged_state_or_a_later_one(tmp_path: Path) -> None:
    seed = int(os.environ.get("POTCHAIN_TEST_SEED", time.time_ns() % 2**32))
    print(f"crash test seed {seed} (replay with POTCHAIN_TEST_SEED={seed})")
    chooser = random.Random(seed)
    path = tmp_path / "signer"
    acknowledged = -1
    outcomes = {"before the first save": 0, "at the last acknowledged state": 0, "at the state being saved": 0}
    leftovers = {"temporary files left": 0}
    for kill in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", child.communicate()[1].decode()
        time.sleep(chooser.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        stdout, stderr = child.communicate()
        assert b"Traceback" not in stderr, stderr.decode()
        lines = stdout.split()
        if lines:
            assert int(lines[0]) == acknowledged + 1, f"kill {kill}: it resumed from {int(lines[0])}"
            acknowledged = int(lines[-1])

        leftovers["temporary files left"] += sum(p.name != "signer" for p in tmp_path.iterdir())
        state = SignerRecord.open(path).load(bytes(32))  # decodes: not torn
        found = -1 if state is None else index_of(state)
        assert found in (acknowledged, acknowledged + 1), f"kill {kill}: record at {found}, acknowledged {acknowledged}"
        assert state is None or state == growing_state(found, bytes(32))
        assert [p.name for p in tmp_path.iterdir()] == ["signer"] or found == -1
        outcome = 0 if found == -1 else 1 if found == acknowledged else 2
        outcomes[list(outcomes)[outcome]] += 1
        acknowledged = found
    print(f"kills left the record {outcomes}, {leftovers}")
    assert acknowledged > 10, "the children saved almost nothing: the test exercised nothing"


# --- The voting machine, restarted from its record ---------------------------------------

TIMEOUTS = TimeoutParameters(1000, 500, 500, 250)
KEYS = [bytes([index + 1]) * 32 for index in range(4)]
VALIDATORS = ValidatorSet(dict.fromkeys(KEYS, 1), 2, 3)
BLOCKS = [BLOCK_A, BLOCK_B, BLOCK_C]


class Crash(Exception):
    """The node is killed (here: between saving a state and signing the message)."""


@dataclass
class SimulatedValidator:
    """A node running `HeightVoting` for KEYS[0], saving its state before each signature,
    with random input from the other validators and random crashes."""

    path: Path
    rng: random.Random
    record: SignerRecord = field(init=False)
    voting: HeightVoting = field(init=False)
    decided: dict[int, bytes] = field(default_factory=dict)
    emitted: list[Proposal | Vote] = field(default_factory=list)
    """Every message it signed, across restarts."""
    timeouts: list[Timeout] = field(default_factory=list)
    checks: list[bytes] = field(default_factory=list)
    values: list[ProposeValue] = field(default_factory=list)
    resumed_with_messages: int = 0
    locks: int = 0

    def __post_init__(self) -> None:
        self.record = SignerRecord.open(self.path)
        self.voting = HeightVoting(1, VALIDATORS, TIMEOUTS, KEYS[0])
        self.carry_out(self.voting.start())

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                before = self.record.load(KEYS[0])
                check_signable(before, action.message)
                self.record.save_before_signing(KEYS[0], self.voting.signer_state(), action.message)
                if self.rng.random() < 0.03:
                    raise Crash
                self.emitted.append(action.message)
            elif isinstance(action, ScheduleTimeout):
                self.timeouts.append(action.timeout)
            elif isinstance(action, CheckBlock):
                self.checks.append(action.block_hash)
            elif isinstance(action, ProposeValue):
                self.values.append(action)
            elif isinstance(action, Decide):
                self.decided[action.commit.height] = action.commit.block_hash
                self.start_height(action.commit.height + 1)
                return

    def start_height(self, height: int) -> None:
        self.voting = HeightVoting(height, VALIDATORS, TIMEOUTS, KEYS[0])
        self.timeouts, self.checks, self.values = [], [], []
        self.carry_out(self.voting.start())

    def restart(self) -> None:
        """A new process: the record read back from disk, the machine resumed from it."""
        self.record = SignerRecord.open(self.path)
        saved = self.record.load(KEYS[0])
        height = 1 + len(self.decided)
        self.timeouts, self.checks, self.values = [], [], []
        if saved is None or saved.height != height:
            self.voting = HeightVoting(height, VALIDATORS, TIMEOUTS, KEYS[0])
        else:
            self.voting = HeightVoting.resume(saved, VALIDATORS, TIMEOUTS, KEYS[0])
            self.resumed_with_messages += bool(saved.sent)
        self.carry_out(self.voting.start())

    def step(self) -> None:
        """One random event."""
        voting, rng = self.voting, self.rng
        locked = voting.locked_round
        round = max(0, voting.round + rng.choice([-1, 0, 0, 0, 1]))
        favourite = BLOCKS[(voting.height + round) % 3] if rng.random() < 0.7 else rng.choice([*BLOCKS, None])
        choice = rng.random()
        if choice < 0.03:
            raise Crash
        if choice < 0.15 and self.timeouts:
            timeout = self.timeouts.pop(rng.randrange(len(self.timeouts)))
            voting.on_tick(voting.time + 1)
            self.carry_out(voting.on_timeout(timeout))
        elif choice < 0.25 and self.checks:
            block = self.checks.pop(rng.randrange(len(self.checks)))
            self.carry_out(voting.on_block_checked(block, rng.random() < 0.9))
        elif choice < 0.3 and self.values:
            value = self.values.pop()
            self.carry_out(voting.on_value(value.round, rng.choice(BLOCKS)))
        elif choice < 0.45:
            proposer = voting.get_proposer(round)
            if proposer != KEYS[0]:
                block = favourite or rng.choice(BLOCKS)
                valid_round = rng.choice([-1, -1, *range(round)])
                self.carry_out(voting.on_proposal(Proposal(voting.height, round, block, valid_round, proposer)))
        else:
            kind = rng.choice([VoteKind.PREVOTE, VoteKind.PRECOMMIT])
            sender = rng.choice(KEYS[1:])
            self.carry_out(voting.on_vote(Vote(kind, voting.height, round, favourite, voting.time, sender)))
        self.locks += voting.locked_round > locked


def conflicting_pairs(messages: list[Proposal | Vote]) -> list[tuple[Proposal | Vote, Proposal | Vote]]:
    """Pairs of signed messages with the same height, round and kind but not the same content."""
    first: dict[tuple[int, int, Step], Proposal | Vote] = {}
    pairs = []
    for message in messages:
        kept = first.setdefault((message.height, message.round, message_step(message)), message)
        if kept.unsigned_fields() != message.unsigned_fields():
            pairs.append((kept, message))
    return pairs


def test_a_machine_restarted_from_its_record_never_signs_a_conflicting_message(tmp_path: Path) -> None:
    seed = int(os.environ.get("POTCHAIN_TEST_SEED", time.time_ns() % 2**32))
    print(f"machine test seed {seed} (replay with POTCHAIN_TEST_SEED={seed})")
    totals = {"crashes": 0, "resumed": 0, "locks": 0, "decided": 0, "late rounds": 0, "signed": 0}
    for run in range(8):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        node = SimulatedValidator(directory / "signer", random.Random(seed + run))
        for _ in range(250):
            try:
                node.step()
            except Crash:
                totals["crashes"] += 1
                while True:  # it may be killed again while it re-sends what it signed
                    try:
                        node.restart()
                        break
                    except Crash:
                        totals["crashes"] += 1
        pairs = conflicting_pairs(node.emitted)
        assert pairs == [], f"seed {seed + run}: signed conflicting messages {pairs[0]}"
        totals["resumed"] += node.resumed_with_messages
        totals["locks"] += node.locks
        totals["decided"] += len(node.decided)
        totals["late rounds"] += sum(message.round > 0 for message in node.emitted)
        totals["signed"] += len(node.emitted)
    print(totals)
    assert all(count > 0 for count in totals.values()), f"the runs exercised too little: {totals}"


def test_a_machine_that_forgot_what_it_signed_is_stopped(tmp_path: Path) -> None:
    """A restart that loses the record's content (a fresh machine) would prevote
    another proposal in the same round: the record refuses to save that."""
    path = tmp_path / "signer"
    proposer = HeightVoting(1, VALIDATORS, TIMEOUTS).get_proposer(0)
    me = next(key for key in KEYS if key != proposer)
    record = SignerRecord.open(path)

    def prevotes(voting: HeightVoting, block: bytes) -> list[Proposal | Vote]:
        """The machine gets round 0's proposal of `block` and finds it valid: what it signs."""
        actions = voting.start() + voting.on_proposal(Proposal(1, 0, block, -1, proposer))
        actions += voting.on_block_checked(block, True)
        signed = []
        for action in actions:
            if isinstance(action, Broadcast):
                record.save_before_signing(me, voting.signer_state(), action.message)
                signed.append(action.message)
        return signed

    assert prevotes(HeightVoting(1, VALIDATORS, TIMEOUTS, me), BLOCK_A) == [prevote(0, BLOCK_A, 1, me, 0)]
    with pytest.raises(ConflictingSignature, match="forgets prevote"):
        prevotes(HeightVoting(1, VALIDATORS, TIMEOUTS, me), BLOCK_B)  # restarted without its record
    saved = SignerRecord.open(path).load(me)
    with pytest.raises(ConflictingSignature, match="conflicts with prevote"):
        check_signable(saved, prevote(0, BLOCK_B, 1, me, 0))
    assert saved is not None
    resumed = HeightVoting.resume(saved, VALIDATORS, TIMEOUTS, me)  # restarted properly
    assert prevotes(resumed, BLOCK_B) == [prevote(0, BLOCK_A, 1, me, 0)]  # re-sends its prevote, no other
