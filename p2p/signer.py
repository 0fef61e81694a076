"""A validator's signer state, kept on disk: no conflicting signature after a restart.

The voting machine (`consensus.voting.HeightVoting`) is pure: after a restart
it knows only what it is given back. A validator that prevoted block A, was
killed and restarted with nothing would happily prevote block B in the same
round, and two signatures for one round are slashable evidence (and, from
more than 1/3 of stake, break safety). So before the node signs any message
the machine emits (`Broadcast`), it saves the machine's `SignerState` (its
height, round, step, lock, valid value and every message it signed at the
height) in this record, durably; after a restart it resumes the machine from
it (`HeightVoting.resume`), and the machine re-sends those messages, or
carries on, but never signs one that conflicts with them.

What this module guarantees:

- **Saved before signed.** `SignerRecord.save_before_signing` returns only
  once a state recording the message is on disk (file and directory synced).
  The signature does not exist before that, so there is no moment at which a
  crash leaves a signature out there and no record of it: a crash before the
  save returns means nothing was signed; a crash after it means the message
  is in the record.
- **Never torn.** A save writes the whole record to a new temporary file in
  the same directory (a unique name per call, so two saves never share one),
  flushes and fsyncs it, `os.replace`s it over the record (an atomic rename),
  then fsyncs the directory so that the rename itself is durable. A kill -9
  (or a power cut) between any two instructions leaves either the old record
  or the new one, never a mix. A leftover temporary file is never the record
  (at most a copy of a state whose save never returned: nothing was signed
  on it), and is removed when the record is next opened.
- **Refused, not forgotten.** An unreadable or corrupt record raises
  `SignerRecordError` naming the file and what to do: starting fresh could
  make the validator sign a message that conflicts with one it signed before.
- **Defence in depth.** Independently of the machine, the record refuses to
  save a state that would let the validator go back on what it signed
  (`check_successor`): a lower height, round or step, a lock given up at the
  same height, a signed message forgotten, or a new message `check_signable`
  refuses, that is one that conflicts with a message signed before (same
  height, round and kind, other content) or that belongs to a height, round
  or step the validator has already left. This is the check Tendermint's
  private validator makes on height, round and step. A refusal means: do not
  sign (a node whose chain is behind its record's height, say, catches up by
  sync rather than vote at a height it has left).

The record holds one `SignerState` per validator key (a node may run several
validator keys, each with a machine of its own), in one file; every save
rewrites the file. Messages are kept unsigned: the state records what was
signed, and signing the same content again gives the same signature.

Format (canonical msgpack, `chain.encoding`): `[FORMAT_VERSION, entries]`,
entries `[validator, state]` sorted by validator; a state is `[height, round,
step, locked_value, locked_round, valid_value, valid_round, sent]` (a step as
its integer, a missing block hash as empty bytes), and each sent message is
`[type, unsigned fields]` with type the `MessageType` of its signature
(proposal, prevote or precommit).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from chain.crypto import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, MessageType
from chain.encoding import MAX_ARRAY_LENGTH, MAX_MESSAGE_BYTES, DecodeError, Fields, pack, unpack
from chain.files import SECRET_MODE, fsync_directory, remove_leftovers, write_atomically
from chain.votes import HASH_BYTES, MAX_ROUND, Proposal, Vote, VoteKind
from consensus.voting import SignerState, Step

FORMAT_VERSION = 1
"""The record's format; a file of another version is refused, never guessed at."""

MAX_SENT_MESSAGES = MAX_ARRAY_LENGTH
"""Most messages one validator's state may hold at one height (2 or 3 a round:
a height past about 1,300 rounds stops its validators signing rather than
write a record it could not read back)."""

_PLACEHOLDER_SIGNATURE = bytes(SIGNATURE_BYTES)
"""Stands in for the signature when an unsigned message is decoded with `from_fields`."""

_MESSAGE_TYPES = {
    Step.PROPOSE: MessageType.PROPOSAL,
    Step.PREVOTE: MessageType.PREVOTE,
    Step.PRECOMMIT: MessageType.PRECOMMIT,
}

_REMOVAL_ADVICE = (
    "The validators in it will not sign until this is resolved. Restore the file from a good copy, or remove it "
    "only if none of its validators has signed a proposal or vote at a height the network has not yet decided "
    "(for instance, none has run since the last decided height): a validator that forgets what it signed may sign "
    "a conflicting message and be slashed."
)


class SignerError(ValueError):
    """The signer refuses: signing now could conflict with what a validator signed before."""


class ConflictingSignature(SignerError):
    """The message (or state) conflicts with what the validator signed or saved before."""


class SignerRecordError(SignerError):
    """The record file cannot be read: refuse to sign rather than risk a conflicting signature."""


# --- Messages -----------------------------------------------------------------


def message_step(message: Proposal | Vote) -> Step:
    """The step a message is signed for: a proposal in PROPOSE, a prevote in PREVOTE, a precommit in PRECOMMIT.

    It is also the message's kind: one validator signs at most one message of
    each kind per height and round."""
    if isinstance(message, Proposal):
        return Step.PROPOSE
    return Step.PREVOTE if message.kind == VoteKind.PREVOTE else Step.PRECOMMIT


def message_signer(message: Proposal | Vote) -> bytes:
    """The public key that signs the message."""
    return message.proposer if isinstance(message, Proposal) else message.validator


def describe_message(message: Proposal | Vote) -> str:
    """A message in words, for errors and logs."""
    where = f"at height {message.height} round {message.round}"
    if isinstance(message, Proposal):
        return f"proposal {where} of block {message.block_hash.hex()[:16]} (valid round {message.valid_round})"
    block = "nil" if message.block_hash is None else f"block {message.block_hash.hex()[:16]}"
    kind = "prevote" if message.kind == VoteKind.PREVOTE else "precommit"
    return f"{kind} {where} for {block} (timestamp {message.timestamp})"


def _unsigned(message: Proposal | Vote) -> Proposal | Vote:
    return message if message.signature == b"" else replace(message, signature=b"")


def _unsigned_state(state: SignerState) -> SignerState:
    if all(message.signature == b"" for message in state.sent):
        return state
    return replace(state, sent=tuple(_unsigned(message) for message in state.sent))


def _same_message(first: Proposal | Vote, second: Proposal | Vote) -> bool:
    """The same signed content (everything but the signature)."""
    return type(first) is type(second) and first.unsigned_fields() == second.unsigned_fields()


def _message_fields(message: Proposal | Vote) -> list[Any]:
    return [int(_MESSAGE_TYPES[message_step(message)]), message.unsigned_fields()]


def _message_from_fields(value: Any) -> Proposal | Vote:
    f = Fields(value, "signed message", ("type", "fields"))
    message_type = f.integer("type", MessageType.PROPOSAL, MessageType.PRECOMMIT)
    unsigned = f.array("fields", 8)
    message: Proposal | Vote
    if message_type == MessageType.PROPOSAL:
        if len(unsigned) != 5:
            raise DecodeError(f"signed proposal: {len(unsigned)} fields, want 5")
        message = Proposal.from_fields([*unsigned, _PLACEHOLDER_SIGNATURE])
    else:
        if len(unsigned) != 6:
            raise DecodeError(f"signed vote: {len(unsigned)} fields, want 6")
        message = Vote.from_fields([*unsigned, _PLACEHOLDER_SIGNATURE])
        if _MESSAGE_TYPES[message_step(message)] != message_type:
            raise DecodeError(f"signed message: type {message_type} holds a vote of kind {int(message.kind)}")
    return replace(message, signature=b"")


# --- Signer states ----------------------------------------------------------------


def signer_state_fields(state: SignerState) -> list[Any]:
    """The canonical fields of a signer state (see the module docstring for the layout)."""
    return [
        state.height,
        state.round,
        int(state.step),
        b"" if state.locked_value is None else state.locked_value,
        state.locked_round,
        b"" if state.valid_value is None else state.valid_value,
        state.valid_round,
        [_message_fields(message) for message in state.sent],
    ]


def signer_state_from_fields(value: Any) -> SignerState:
    """A signer state from its decoded fields: every field's type and range checked,
    and the state consistent (`state_inconsistency`); raises DecodeError otherwise."""
    names = ("height", "round", "step", "locked_value", "locked_round", "valid_value", "valid_round", "sent")
    f = Fields(value, "signer state", names)

    def block(name: str) -> bytes | None:
        data = f.binary(name, max_length=HASH_BYTES)
        if len(data) not in (0, HASH_BYTES):
            raise DecodeError(f"signer state.{name}: {len(data)} bytes, want 0 (none) or {HASH_BYTES}")
        return data or None

    state = SignerState(
        height=f.integer("height", 1),
        round=f.integer("round", 0, MAX_ROUND),
        step=Step(f.integer("step", Step.PROPOSE, Step.PRECOMMIT)),
        locked_value=block("locked_value"),
        locked_round=f.integer("locked_round", -1, MAX_ROUND),
        valid_value=block("valid_value"),
        valid_round=f.integer("valid_round", -1, MAX_ROUND),
        sent=tuple(_message_from_fields(item) for item in f.array("sent", MAX_SENT_MESSAGES)),
    )
    problem = state_inconsistency(state)
    if problem is not None:
        raise DecodeError(f"signer state: {problem}")
    return state


def encode_signer_state(state: SignerState) -> bytes:
    """The canonical encoding of one signer state."""
    return pack(signer_state_fields(state))


def decode_signer_state(data: bytes) -> SignerState:
    """A signer state from its canonical encoding; raises DecodeError."""
    return signer_state_from_fields(unpack(data, "signer state"))


def state_inconsistency(state: SignerState, validator: bytes | None = None) -> str | None:
    """What is wrong with a state no honest machine could be in (None: nothing).

    A lock or valid value without its round (or the reverse), either round
    past the state's round, a sent message of another height, a later round,
    another signer (`validator`, or the first message's signer), or two sent
    messages that conflict with each other."""
    if (state.locked_value is None) != (state.locked_round == -1):
        return f"locked value {_hex(state.locked_value)} with locked round {state.locked_round}"
    if (state.valid_value is None) != (state.valid_round == -1):
        return f"valid value {_hex(state.valid_value)} with valid round {state.valid_round}"
    if state.locked_round > state.round or state.valid_round > state.round:
        return f"locked round {state.locked_round} or valid round {state.valid_round} past the round {state.round}"
    signer = validator
    kept: dict[tuple[int, Step], Proposal | Vote] = {}
    for message in state.sent:
        if message.height != state.height or message.round > state.round:
            return f"sent {describe_message(message)}, not at height {state.height} up to round {state.round}"
        signer = message_signer(message) if signer is None else signer
        if message_signer(message) != signer:
            other = message_signer(message).hex()[:16]
            return f"sent {describe_message(message)} signed by {other}, not {signer.hex()[:16]}"
        first = kept.setdefault((message.round, message_step(message)), message)
        if not _same_message(first, message):
            return f"sent {describe_message(first)} and {describe_message(message)}"
    return None


def _hex(value: bytes | None) -> str:
    return "none" if value is None else value.hex()[:16]


# --- The checks ---------------------------------------------------------------


def check_signable(previous: SignerState | None, message: Proposal | Vote) -> None:
    """Raise ConflictingSignature unless a validator whose saved state is
    `previous` (None: it never saved one) may sign `message`.

    Refused: a message at a lower height than the saved one; at the saved
    height, one that conflicts with a sent message of the same round and kind
    (another block, nil instead of a block, another valid round, or even only
    another timestamp: the validator signed that vote already), one for a
    lower round than the saved round, and in the saved round a proposal or
    prevote once the step passed PROPOSE, or a precommit once it reached
    PRECOMMIT (the machine signs each at most once a round, on the way into
    its step). Allowed: signing a sent message again exactly (a restarted
    machine re-sends what it signed), and anything at a later round or height.
    """
    if previous is None:
        return
    signers = {message_signer(sent) for sent in previous.sent}
    if signers and signers != {message_signer(message)}:
        raise SignerError(f"{describe_message(message)} checked against the state of another validator")
    if message.height < previous.height:
        raise ConflictingSignature(
            f"{describe_message(message)}: below the saved height {previous.height} (that height is left behind)"
        )
    if message.height > previous.height:
        return
    step = message_step(message)
    for sent in previous.sent:
        if sent.round != message.round or message_step(sent) != step:
            continue
        if _same_message(sent, message):
            return
        if isinstance(sent, Vote) and isinstance(message, Vote) and sent.block_hash == message.block_hash:
            raise ConflictingSignature(
                f"{describe_message(message)} differs only in its timestamp from {describe_message(sent)}, "
                "signed before: re-send that one"
            )
        raise ConflictingSignature(
            f"{describe_message(message)} conflicts with {describe_message(sent)}, signed before"
        )
    if message.round < previous.round:
        raise ConflictingSignature(f"{describe_message(message)}: below the saved round {previous.round}")
    if message.round == previous.round and not (previous.step < step or previous.step == Step.PROPOSE):
        raise ConflictingSignature(
            f"{describe_message(message)}: the saved state already reached step {previous.step.name} "
            f"in round {previous.round}"
        )


def check_successor(previous: SignerState | None, state: SignerState) -> None:
    """Raise ConflictingSignature unless `state` may replace `previous` as a validator's saved state.

    At a later height anything goes (the messages of the old height are left
    behind with it). At the same height the state must not go back in round
    or step, give up or change its lock, or forget a message it sent; and
    every message it sent that `previous` did not must pass `check_signable`
    against `previous`. A lower height is refused."""
    if previous is None or state.height > previous.height:
        return
    if state.height < previous.height:
        raise ConflictingSignature(f"height {state.height} is below the saved height {previous.height}")
    if (state.round, state.step) < (previous.round, previous.step):
        raise ConflictingSignature(
            f"round {state.round} step {state.step.name} is behind the saved round {previous.round} "
            f"step {previous.step.name} at height {state.height}"
        )
    if state.locked_round < previous.locked_round or (
        state.locked_round == previous.locked_round and state.locked_value != previous.locked_value
    ):
        raise ConflictingSignature(
            f"the lock on {_hex(state.locked_value)} (round {state.locked_round}) replaces the saved lock on "
            f"{_hex(previous.locked_value)} (round {previous.locked_round}) at height {state.height}"
        )
    sent_before = {_unsigned(message) for message in previous.sent}
    sent_now = {_unsigned(message) for message in state.sent}
    for sent in previous.sent:
        if _unsigned(sent) not in sent_now:
            raise ConflictingSignature(f"the state forgets {describe_message(sent)}, signed before")
    for message in state.sent:
        if _unsigned(message) not in sent_before:
            check_signable(previous, message)


# --- The record on disk -------------------------------------------------------------


def encode_record(states: Mapping[bytes, SignerState]) -> bytes:
    """The canonical encoding of a record: each validator's state, by validator."""
    entries = [[validator, signer_state_fields(states[validator])] for validator in sorted(states)]
    return pack([FORMAT_VERSION, entries])


def decode_record(data: bytes) -> dict[bytes, SignerState]:
    """Each validator's state from a record's encoding; raises DecodeError."""
    # A file this node wrote within _check_reads_back's limits: no object budget beyond its bytes.
    value = unpack(data, "signer record", MAX_MESSAGE_BYTES, max_objects=MAX_MESSAGE_BYTES)
    f = Fields(value, "signer record", ("version", "states"))
    version = f.integer("version")
    if version != FORMAT_VERSION:
        raise DecodeError(f"signer record: format version {version}, this node reads {FORMAT_VERSION}")
    states: dict[bytes, SignerState] = {}
    last = b""
    for item in f.array("states"):
        entry = Fields(item, "signer record entry", ("validator", "state"))
        validator = entry.binary("validator", PUBLIC_KEY_BYTES)
        if validator <= last:
            raise DecodeError(f"signer record: validator {validator.hex()[:16]} out of order or repeated")
        state = signer_state_from_fields(entry.raw("state"))
        problem = state_inconsistency(state, validator)
        if problem is not None:
            raise DecodeError(f"signer record: validator {validator.hex()[:16]}: {problem}")
        states[validator] = state
        last = validator
    return states


def _check_reads_back(previous: SignerState | None, state: SignerState, validators: int, size: int) -> None:
    """Raise DecodeError if a record of `size` bytes holding `validators` states,
    `state` among them, would not decode back to them.

    Only what is new since `previous` (which was saved or read, so decodes) is
    checked, so that a save costs little more than the messages it adds."""
    if size > MAX_MESSAGE_BYTES:
        raise DecodeError(f"{size} bytes, limit {MAX_MESSAGE_BYTES}")
    if validators > MAX_ARRAY_LENGTH:
        raise DecodeError(f"{validators} validators, limit {MAX_ARRAY_LENGTH}")
    if len(state.sent) > MAX_SENT_MESSAGES:
        raise DecodeError(f"{len(state.sent)} messages sent at height {state.height}, limit {MAX_SENT_MESSAGES}")
    header = replace(state, sent=())
    if signer_state_from_fields(signer_state_fields(header)) != header:
        raise DecodeError("the state would read back as another")
    known = set() if previous is None or previous.height != state.height else set(previous.sent)
    for message in state.sent:
        if message not in known and _message_from_fields(_message_fields(message)) != message:
            raise DecodeError(f"{describe_message(message)} would read back as another")


class SignerRecord:
    """Each validator key's `SignerState`, persisted at `path` (see the module docstring).

    Thread-safe: a lock serializes saves (each rewrites the whole record, so
    two unserialized saves could each drop the other's update); reads take no
    lock (a save replaces the mapping of states, never changes it)."""

    def __init__(self, path: Path, states: Mapping[bytes, SignerState] | None = None) -> None:
        self.path = path
        self._states: dict[bytes, SignerState] = dict(states or {})
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> SignerRecord:
        """The record at `path` (a missing file: nothing signed yet).

        Removes temporary files a killed save left behind, and syncs the file
        read (a save killed between its rename and its directory sync leaves a
        record that is read but not yet durable). Raises SignerRecordError if
        the file cannot be read or decoded."""
        with contextlib.suppress(OSError):
            remove_leftovers(path)
        if not path.exists():
            return cls(path)
        try:
            data = path.read_bytes()
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            fsync_directory(path.parent)
        except OSError as error:
            raise SignerRecordError(f"{path}: cannot read the signer record ({error}). {_REMOVAL_ADVICE}") from error
        try:
            states = decode_record(data)
        except DecodeError as error:
            raise SignerRecordError(f"{path}: not a readable signer record ({error}). {_REMOVAL_ADVICE}") from error
        return cls(path, states)

    def load(self, validator: bytes) -> SignerState | None:
        """The state last saved for this validator key (None: it never saved one here)."""
        return self._states.get(validator)

    def validators(self) -> tuple[bytes, ...]:
        """The validator keys that have a saved state, in order."""
        return tuple(sorted(self._states))

    def check_signable(self, validator: bytes, message: Proposal | Vote) -> None:
        """`check_signable` against this validator's saved state; also refuses another key's message."""
        if message_signer(message) != validator:
            raise SignerError(f"{describe_message(message)} is signed by another key than {validator.hex()[:16]}")
        check_signable(self.load(validator), message)

    def save(self, validator: bytes, state: SignerState) -> None:
        """Save `state` as this validator's, durably (see the module docstring).

        Returns once the record is on disk, file and directory synced; saving
        the state already saved writes nothing. Raises SignerError (and writes
        nothing) if the state is inconsistent or may not follow the saved one
        (`check_successor`), and OSError if the disk fails."""
        if len(validator) != PUBLIC_KEY_BYTES:
            raise SignerError(f"validator key of {len(validator)} bytes, want {PUBLIC_KEY_BYTES}")
        state = _unsigned_state(state)
        with self._lock:
            previous = self._states.get(validator)
            if previous == state:
                return
            problem = state_inconsistency(state, validator)
            if problem is not None:
                raise SignerError(f"not a state a validator can be in: {problem}")
            check_successor(previous, state)
            states = {**self._states, validator: state}
            data = encode_record(states)
            try:
                _check_reads_back(previous, state, len(states), len(data))
            except DecodeError as error:  # e.g. too many messages at one height
                raise SignerError(f"the signer record would not read back ({error}); refusing to sign") from error
            self._write(data)
            self._states = states

    def save_before_signing(self, validator: bytes, state: SignerState, message: Proposal | Vote) -> None:
        """What a node calls before it signs `message` (a `Broadcast` of the
        machine), with the machine's `signer_state()`: checks that the state
        records the message, then `save`s it. Once this returns, the message
        may be signed; if it raises, it must not be."""
        unsigned = _unsigned(message)
        if message_signer(message) != validator:
            raise SignerError(f"{describe_message(message)} is signed by another key than {validator.hex()[:16]}")
        if not any(_same_message(unsigned, sent) for sent in state.sent):
            raise SignerError(f"{describe_message(message)} is not in the state to save: save the state that sent it")
        self.save(validator, state)

    def _write(self, data: bytes) -> None:
        """Replace the record with `data` atomically and durably (chain/files.py)."""
        write_atomically(self.path, data, SECRET_MODE)
