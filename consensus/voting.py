"""Voting rounds: one height's BFT instance, as a pure state machine.

This is the algorithm of Buchman, Kwon and Milosevic, "The latest gossip on
BFT consensus" (2018), Algorithm 1 (Tendermint), with stake in place of
validator counts. `HeightVoting` decides one block for one height. It does no
I/O and reads no clock: events go in (`on_proposal`, `on_vote`,
`on_block_checked`, `on_value`, `on_timeout`, `on_tick`), and each returns the
actions the node must carry out, in order (`Broadcast` a message it must sign
and send, `ProposeValue`, `CheckBlock`, `ScheduleTimeout`, `Decide`,
`Equivocation`). The node verifies signatures and the sender's stake before a
message goes in; the machine never looks at a signature.

A round: its proposer (`get_proposer`) proposes a block, or re-proposes the
block it last saw 2/3 of stake prevote for (the valid value); validators
prevote for it if they hold it valid and are not locked on another block,
else for nil; on prevotes from 2/3 of stake for a block they lock on it and
precommit it; precommits for one block from 2/3 of stake in one round decide
it. Timeouts (growing with the round) move a round on when messages are late;
messages from more than 1/3 of stake in a later round pull a node forward.

The thresholds: a quorum is stake * quorum_denominator >= total *
quorum_numerator (at least 2/3 by genesis), so two quorums share at least 1/3
of stake; "more than 1/3" (3 * stake > total) includes an honest validator
whenever faulty stake is below 1/3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from chain.crypto import Domain
from chain.votes import Commit, Proposal, Vote, VoteKind

ROUND_WINDOW = 64
"""Messages more than this many rounds ahead of a node's round are not kept
(they only count towards skipping ahead), so a faulty validator cannot make a
node store votes for arbitrarily many rounds."""


class Step(IntEnum):
    """Where a round is."""

    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2


@dataclass(frozen=True)
class ValidatorSet:
    """The stake that votes at one height, and the quorum rule."""

    stakes: Mapping[bytes, int]
    """Stake by validator public key (only validators with stake > 0)."""
    quorum_numerator: int
    """A quorum is at least numerator / denominator of all stake (>= 2/3)."""
    quorum_denominator: int
    """See quorum_numerator."""

    @property
    def total(self) -> int:
        return sum(self.stakes.values())

    def stake_of(self, validators: Iterable[bytes]) -> int:
        """Total stake of distinct validators (non-validators count 0)."""
        return sum(self.stakes.get(validator, 0) for validator in set(validators))

    def is_quorum(self, stake: int) -> bool:
        """stake * denominator >= total * numerator."""
        return stake > 0 and stake * self.quorum_denominator >= self.total * self.quorum_numerator

    def is_beyond_faulty(self, stake: int) -> bool:
        """More than 1/3 of stake: it includes an honest validator while faulty stake is below 1/3."""
        return 3 * stake > self.total


def compute_proposer_order(validators: ValidatorSet, height: int) -> tuple[bytes, ...]:
    """The validators in the order they propose at `height`: round r's proposer
    is entry r mod n (`get_proposer`).

    A stake-weighted random order, drawn without replacement: draw i picks the
    validator whose interval (by public key order, each as wide as its stake)
    holds int(sha256(b"potchain/proposer" || height || i)) mod the remaining
    stake. Round 0's proposer is each validator with probability proportional
    to its stake; every validator proposes once in any n consecutive rounds,
    so a height meets an honest proposer within n rounds. The order depends
    only on the height and the validator set: nobody can grind it.
    """
    remaining = sorted(validators.stakes.items())
    order: list[bytes] = []
    draw = 0
    while remaining:
        total = sum(stake for _, stake in remaining)
        digest = hashlib.sha256(b"potchain/proposer" + height.to_bytes(8, "big") + draw.to_bytes(4, "big")).digest()
        point = int.from_bytes(digest, "big") % total
        for index, (validator, stake) in enumerate(remaining):
            if point < stake:
                order.append(validator)
                del remaining[index]
                break
            point -= stake
        draw += 1
    return tuple(order)


@dataclass(frozen=True)
class TimeoutParameters:
    """How long a node waits in each step: base + round * increment (milliseconds)."""

    propose_ms: int
    """Waiting for the round's proposal (it includes checking the proposed block)."""
    prevote_ms: int
    """Waiting for more prevotes once 2/3 of stake prevoted for different things."""
    precommit_ms: int
    """Waiting for more precommits once 2/3 of stake precommitted for different things."""
    increment_ms: int
    """Added per round, so that after the network settles the timeouts outgrow its delays."""

    def duration_ms(self, step: Step, round: int) -> int:
        base = {Step.PROPOSE: self.propose_ms, Step.PREVOTE: self.prevote_ms, Step.PRECOMMIT: self.precommit_ms}
        return base[step] + round * self.increment_ms


@dataclass(frozen=True)
class Timeout:
    """A timer the node runs for the machine."""

    step: Step
    """Which step's timeout."""
    height: int
    """The height it was set at."""
    round: int
    """The round it was set at."""


# --- Actions (what the node must do) ----------------------------------------


@dataclass(frozen=True)
class Broadcast:
    """Sign and send this message (after saving `HeightVoting.signer_state()`)."""

    message: Proposal | Vote


@dataclass(frozen=True)
class ProposeValue:
    """Our turn to propose with no valid value: build a block, then call `on_value`."""

    height: int
    round: int


@dataclass(frozen=True)
class CheckBlock:
    """Obtain this block and check it against the rules, then call `on_block_checked`."""

    block_hash: bytes


@dataclass(frozen=True)
class ScheduleTimeout:
    """Call `on_timeout(timeout)` after `milliseconds`."""

    timeout: Timeout
    milliseconds: int


@dataclass(frozen=True)
class Decide:
    """The height is decided: this block, with its commit certificate."""

    commit: Commit


@dataclass(frozen=True)
class Equivocation:
    """Two conflicting messages signed by one validator: slashable evidence."""

    first: Proposal | Vote
    second: Proposal | Vote


Action = Broadcast | ProposeValue | CheckBlock | ScheduleTimeout | Decide | Equivocation


@dataclass(frozen=True)
class SignerState:
    """What a validator saves to disk before it signs anything, and resumes from
    after a restart, so that it never signs a message that conflicts with one it
    signed before (section 15 of docs/spec.md)."""

    height: int
    """The height being voted on."""
    round: int
    """The round reached."""
    step: Step
    """The step reached in it."""
    locked_value: bytes | None
    """The block this validator is locked on (precommitted), if any."""
    locked_round: int
    """The round of the lock (-1: none)."""
    valid_value: bytes | None
    """The last block it saw 2/3 of stake prevote for."""
    valid_round: int
    """The round of that (-1: none)."""
    sent: tuple[Proposal | Vote, ...]
    """Every message it signed at this height (re-sent after a restart)."""


@dataclass
class HeightVoting:
    """One node's view of one height's voting (see the module docstring).

    `me` is this node's validator key, or None for a node that only follows.
    Invalid input (a message for another height, from a non-validator, or a
    proposal from the wrong proposer) is ignored and changes nothing.
    """

    height: int
    validators: ValidatorSet
    timeouts: TimeoutParameters
    me: bytes | None = None
    time: int = 0
    """The node's clock (Unix seconds), stamped on its votes."""
    round: int = 0
    step: Step = Step.PROPOSE
    locked_value: bytes | None = None
    locked_round: int = -1
    valid_value: bytes | None = None
    valid_round: int = -1
    decision: Commit | None = None
    proposer_order: tuple[bytes, ...] = ()
    proposals: dict[int, Proposal] = field(default_factory=dict)
    """The round proposer's (first) proposal, by round."""
    prevotes: dict[int, dict[bytes, tuple[Vote, ...]]] = field(default_factory=dict)
    """Prevotes by round, then by validator: the first one each sent, and a
    conflicting second one if it sent one (which is evidence). Both count: two
    blocks can only both reach a quorum in one round if 1/3 of stake signed twice."""
    precommits: dict[int, dict[bytes, tuple[Vote, ...]]] = field(default_factory=dict)
    """Precommits, kept like prevotes."""
    commits: dict[bytes, Commit] = field(default_factory=dict)
    """Commit certificates received whole (from a peer that decided), by block."""
    highest_round: dict[bytes, int] = field(default_factory=dict)
    """The highest round each validator sent anything in (for skipping ahead)."""
    validity: dict[bytes, bool] = field(default_factory=dict)
    """Blocks checked against the rules, by hash."""
    sent: list[Proposal | Vote] = field(default_factory=list)
    """What this node signed at this height."""
    _checks: set[bytes] = field(default_factory=set)
    _fired: set[tuple[str, int]] = field(default_factory=set)
    _evidence: set[tuple[bytes, int, int]] = field(default_factory=set)
    _started: bool = False

    def __post_init__(self) -> None:
        self.proposer_order = compute_proposer_order(self.validators, self.height)

    # --- queries ----------------------------------------------------------------

    def get_proposer(self, round: int) -> bytes:
        return self.proposer_order[round % len(self.proposer_order)]

    def signer_state(self) -> SignerState:
        return SignerState(
            self.height, self.round, self.step, self.locked_value, self.locked_round, self.valid_value,
            self.valid_round, tuple(self.sent),
        )  # fmt: skip

    def prevote_stake(self, round: int, block_hash: bytes | None = None, any_value: bool = False) -> int:
        """Stake that prevoted for `block_hash` (None: nil) in `round`, or for anything."""
        return _stake(self.validators, self.prevotes.get(round, {}), block_hash, any_value)

    def precommit_stake(self, round: int, block_hash: bytes | None = None, any_value: bool = False) -> int:
        """Stake that precommitted for `block_hash` (None: nil) in `round`, or for anything."""
        return _stake(self.validators, self.precommits.get(round, {}), block_hash, any_value)

    # --- events -----------------------------------------------------------------

    def start(self) -> list[Action]:
        """Begin the height at round 0 (or resume where `resume` left it)."""
        if self._started:
            return []
        self._started = True
        if self.sent:  # resumed after a restart: re-send what it signed, carry on from its step
            actions: list[Action] = [Broadcast(message) for message in self.sent]
            actions.append(ScheduleTimeout(Timeout(self.step, self.height, self.round), self._duration(self.step)))
            if self.step == Step.PROPOSE:
                actions += self._propose_if_our_turn()
            return actions + self._process()
        return self._start_round(0) + self._process()

    @classmethod
    def resume(
        cls, state: SignerState, validators: ValidatorSet, timeouts: TimeoutParameters, me: bytes
    ) -> HeightVoting:
        """The machine a validator restarts with: its round, step, locks and sent messages as saved."""
        voting = cls(state.height, validators, timeouts, me)
        voting.round, voting.step = state.round, state.step
        voting.locked_value, voting.locked_round = state.locked_value, state.locked_round
        voting.valid_value, voting.valid_round = state.valid_value, state.valid_round
        for message in state.sent:
            voting._record(message)
        voting.sent = list(state.sent)
        return voting

    def on_tick(self, time: int) -> None:
        self.time = max(self.time, time)

    def on_proposal(self, proposal: Proposal) -> list[Action]:
        if proposal.height != self.height or proposal.proposer != self.get_proposer(proposal.round):
            return []
        if not -1 <= proposal.valid_round < proposal.round or proposal.round > self.round + ROUND_WINDOW:
            self._note_round(proposal.proposer, proposal.round)
            return []
        actions = self._record(proposal)
        return actions + self._process()

    def on_vote(self, vote: Vote) -> list[Action]:
        if vote.height != self.height or vote.validator not in self.validators.stakes:
            return []
        if vote.round > self.round + ROUND_WINDOW:
            self._note_round(vote.validator, vote.round)
            return self._process()
        actions = self._record(vote)
        return actions + self._process()

    def on_commit(self, commit: Commit) -> list[Action]:
        """A commit certificate for this height from a peer (the node verified its signatures).

        A node that missed some precommits, or kept an equivocator's other
        precommit first, still decides from the certificate a peer decided by."""
        if commit.height != self.height or commit.block_hash in self.commits or len(self.commits) >= 8:
            return []
        validators = [validator for validator, _, _ in commit.signatures]
        if len(set(validators)) != len(validators) or not self.validators.is_quorum(
            self.validators.stake_of(validators)
        ):
            return []
        self.commits[commit.block_hash] = commit
        return self._process()

    def on_block_checked(self, block_hash: bytes, valid: bool) -> list[Action]:
        """The node fetched and checked a block this machine asked about (`CheckBlock`)."""
        if block_hash in self.validity:
            return []
        self.validity[block_hash] = valid
        return self._process()

    def on_value(self, round: int, block_hash: bytes) -> list[Action]:
        """The block this node built for its turn (`ProposeValue`); it is valid by construction."""
        if round != self.round or self.step != Step.PROPOSE or self._proposed(round):
            return []
        self.validity.setdefault(block_hash, True)
        assert self.me is not None
        return self._send(Proposal(self.height, round, block_hash, -1, self.me)) + self._process()

    def on_timeout(self, timeout: Timeout) -> list[Action]:
        if timeout.height != self.height or timeout.round != self.round or self.decision is not None:
            return []
        actions: list[Action] = []
        if timeout.step == Step.PROPOSE and self.step == Step.PROPOSE:
            actions += self._vote(VoteKind.PREVOTE, None)
            self.step = Step.PREVOTE
        elif timeout.step == Step.PREVOTE and self.step == Step.PREVOTE:
            actions += self._vote(VoteKind.PRECOMMIT, None)
            self.step = Step.PRECOMMIT
        elif timeout.step == Step.PRECOMMIT:
            actions += self._start_round(self.round + 1)
        return actions + self._process()

    # --- the rules --------------------------------------------------------------

    def _process(self) -> list[Action]:
        """Apply every rule whose condition holds, until none does."""
        actions: list[Action] = []
        while True:
            progress = self._apply_one_rule()
            if progress is None:
                return actions
            actions += progress

    def _apply_one_rule(self) -> list[Action] | None:
        """The first rule that fires (its actions), or None."""
        if self.decision is not None:
            return None
        # Decide: precommits for one block from a quorum in one round, and the block valid.
        candidates = [(commit.round, block) for block, commit in self.commits.items()]
        for round, votes in self.precommits.items():
            candidates += [(round, block) for block in _blocks(votes) if self.validators.is_quorum(
                self.precommit_stake(round, block))]  # fmt: skip
        for round, block_hash in candidates:
            valid = self._is_valid(block_hash)
            if valid:
                return self._decide(round, block_hash)
            if valid is None and (actions := self._check(block_hash)) is not None:
                return actions
        # Skip ahead: more than 1/3 of stake sent messages in a later round.
        target = self._skip_target()
        if target > self.round:
            return self._start_round(target)
        r = self.round
        proposal = self.proposals.get(r)
        if self.step == Step.PROPOSE and proposal is not None:
            block, vr = proposal.block_hash, proposal.valid_round
            # A new block, or a re-proposal backed by prevotes from a quorum in its valid round.
            if vr == -1 or self.validators.is_quorum(self.prevote_stake(vr, block)):
                valid = self._is_valid(block)
                if valid is not None:
                    unlocked = self.locked_round == -1 if vr == -1 else self.locked_round <= vr
                    good = valid and (unlocked or self.locked_value == block)
                    self.step = Step.PREVOTE
                    return self._vote(VoteKind.PREVOTE, block if good else None)
                if (actions := self._check(block)) is not None:
                    return actions
        prevoted = self.validators.is_quorum(self.prevote_stake(r, any_value=True))
        if self.step == Step.PREVOTE and self._first("prevote-timeout", r) and prevoted:
            self._fired.add(("prevote-timeout", r))
            return [ScheduleTimeout(Timeout(Step.PREVOTE, self.height, r), self._duration(Step.PREVOTE))]
        if self.step >= Step.PREVOTE and self._first("polka", r):
            for block_hash in _blocks(self.prevotes.get(r, {})):
                if not self.validators.is_quorum(self.prevote_stake(r, block_hash)):
                    continue
                valid = self._is_valid(block_hash)
                if valid is None:
                    if (actions := self._check(block_hash)) is not None:
                        return actions
                    continue
                if not valid:
                    continue
                self._fired.add(("polka", r))
                actions = []
                if self.step == Step.PREVOTE:
                    self.locked_value, self.locked_round = block_hash, r
                    actions = self._vote(VoteKind.PRECOMMIT, block_hash)
                    self.step = Step.PRECOMMIT
                self.valid_value, self.valid_round = block_hash, r
                return actions
        if self.step == Step.PREVOTE and self.validators.is_quorum(self.prevote_stake(r, None)):
            self.step = Step.PRECOMMIT
            return self._vote(VoteKind.PRECOMMIT, None)
        if self._first("precommit-timeout", r) and self.validators.is_quorum(self.precommit_stake(r, any_value=True)):
            self._fired.add(("precommit-timeout", r))
            return [ScheduleTimeout(Timeout(Step.PRECOMMIT, self.height, r), self._duration(Step.PRECOMMIT))]
        return None

    def _start_round(self, round: int) -> list[Action]:
        self.round, self.step = round, Step.PROPOSE
        timeout = ScheduleTimeout(Timeout(Step.PROPOSE, self.height, round), self._duration(Step.PROPOSE))
        return [timeout, *self._propose_if_our_turn()]

    def _propose_if_our_turn(self) -> list[Action]:
        """As the round's proposer: re-propose the valid value, or ask the node for a new block."""
        round = self.round
        if self.me is None or self.get_proposer(round) != self.me or self._proposed(round):
            return []
        if self.valid_value is not None:
            return self._send(Proposal(self.height, round, self.valid_value, self.valid_round, self.me))
        return [ProposeValue(self.height, round)]

    def _decide(self, round: int, block_hash: bytes) -> list[Action]:
        if block_hash in self.commits and self.commits[block_hash].round == round:
            self.decision = self.commits[block_hash]
        else:
            votes = self.precommits[round].values()
            self.decision = Commit.of([v for kept in votes for v in kept if v.block_hash == block_hash])
        return [Decide(self.decision)]

    # --- helpers ----------------------------------------------------------------

    def _record(self, message: Proposal | Vote) -> list[Action]:
        """Keep a message (the first of its kind per sender and round); a conflicting second is evidence."""
        first: Proposal | Vote | None
        if isinstance(message, Proposal):
            sender = message.proposer
            first = self.proposals.setdefault(message.round, message)
            if first is message:
                first = None
        else:
            sender = message.validator
            table = self.prevotes if message.kind == VoteKind.PREVOTE else self.precommits
            votes = table.setdefault(message.round, {})
            kept = votes.get(sender, ())
            first = kept[0] if kept else None
            if first is None:
                votes[sender] = (message,)
            elif len(kept) == 1 and not _same_content(first, message):
                votes[sender] = (first, message)
        self._note_round(sender, message.round)
        if first is None or _same_content(first, message):
            return []
        kind = 0 if isinstance(message, Proposal) else int(message.kind)
        if (sender, message.round, kind) in self._evidence:
            return []
        self._evidence.add((sender, message.round, kind))
        return [Equivocation(first, message)]

    def _note_round(self, sender: bytes, round: int) -> None:
        if round > self.highest_round.get(sender, -1):
            self.highest_round[sender] = round

    def _skip_target(self) -> int:
        """The highest round r such that validators with more than 1/3 of stake sent messages in rounds >= r."""
        stake = 0
        for validator, round in sorted(self.highest_round.items(), key=lambda item: -item[1]):
            if round <= self.round:
                return -1
            stake += self.validators.stakes.get(validator, 0)
            if self.validators.is_beyond_faulty(stake):
                return round
        return -1

    def _vote(self, kind: VoteKind, block_hash: bytes | None) -> list[Action]:
        if self.me is None or self.me not in self.validators.stakes:
            return []
        return self._send(Vote(kind, self.height, self.round, block_hash, self.time, self.me))

    def _send(self, message: Proposal | Vote) -> list[Action]:
        self.sent.append(message)
        self._record(message)
        return [Broadcast(message)]

    def _proposed(self, round: int) -> bool:
        return any(isinstance(m, Proposal) and m.round == round for m in self.sent)

    def _is_valid(self, block_hash: bytes) -> bool | None:
        return self.validity.get(block_hash)

    def _check(self, block_hash: bytes) -> list[Action] | None:
        """Ask the node to check a block once; None if already asked."""
        if block_hash in self._checks:
            return None
        self._checks.add(block_hash)
        return [CheckBlock(block_hash)]

    def _first(self, rule: str, round: int) -> bool:
        return (rule, round) not in self._fired

    def _duration(self, step: Step) -> int:
        return self.timeouts.duration_ms(step, self.round)


def _stake(
    validators: ValidatorSet, votes: dict[bytes, tuple[Vote, ...]], block_hash: bytes | None, any_value: bool
) -> int:
    return validators.stake_of(
        validator for validator, kept in votes.items() if any_value or any(v.block_hash == block_hash for v in kept)
    )


def _blocks(votes: dict[bytes, tuple[Vote, ...]]) -> set[bytes]:
    """The blocks (not nil) voted for."""
    return {v.block_hash for kept in votes.values() for v in kept if v.block_hash is not None}


def _same_content(first: Proposal | Vote, second: Proposal | Vote) -> bool:
    """The same message apart from the signature (and a vote's timestamp)."""
    if isinstance(first, Proposal) and isinstance(second, Proposal):
        return (first.block_hash, first.valid_round) == (second.block_hash, second.valid_round)
    if isinstance(first, Vote) and isinstance(second, Vote):
        return first.block_hash == second.block_hash
    return False


# --- Checking signed messages and certificates (pure; the node calls these) --


class InvalidVote(Exception):
    """A voting message or certificate that breaks a rule; the message names it."""


def validate_vote(vote: Vote, validators: ValidatorSet, domain: Domain) -> None:
    """A vote from a validator of this height's set, signed by it."""
    if vote.validator not in validators.stakes:
        raise InvalidVote(f"vote: {vote.validator.hex()[:16]} is not a validator at height {vote.height}")
    if not vote.is_signed_by_validator(domain):
        raise InvalidVote(f"vote: not {vote.validator.hex()[:16]}'s signature")


def validate_proposal(proposal: Proposal, validators: ValidatorSet, domain: Domain) -> None:
    """A proposal from the round's proposer, signed by it."""
    want = compute_proposer_order(validators, proposal.height)
    proposer = want[proposal.round % len(want)]
    if proposal.proposer != proposer:
        got = proposal.proposer.hex()[:16]
        raise InvalidVote(f"proposal: proposer {got}, want {proposer.hex()[:16]} for round {proposal.round}")
    if not proposal.is_signed_by_proposer(domain):
        raise InvalidVote("proposal: not the proposer's signature")


def validate_commit(commit: Commit, validators: ValidatorSet, domain: Domain) -> None:
    """Precommits for the commit's block in its round, from distinct validators of
    the height's set holding a quorum of stake, every signature valid."""
    signers = [validator for validator, _, _ in commit.signatures]
    if len(set(signers)) != len(signers):
        raise InvalidVote("commit: a validator signs twice")
    if signers != sorted(signers):
        raise InvalidVote("commit: signatures not ordered by validator")
    for vote in commit.precommits():
        validate_vote(vote, validators, domain)
    stake = validators.stake_of(signers)
    if not validators.is_quorum(stake):
        need = f"{validators.quorum_numerator}/{validators.quorum_denominator}"
        raise InvalidVote(f"commit: stake {stake} of {validators.total}, need >= {need}")


def compute_commit_time(commit: Commit, validators: ValidatorSet) -> int:
    """The decided block's time: the stake-weighted median of its precommits'
    timestamps (the lowest timestamp at which the stake precommitting at or
    before it reaches half the certificate's stake). Faulty validators hold
    less than 1/3 of all stake, so less than half of a quorum's: the median
    lies between two honest validators' clocks."""
    stamped = sorted((timestamp, validators.stakes.get(validator, 0)) for validator, timestamp, _ in commit.signatures)
    total = sum(stake for _, stake in stamped)
    running = 0
    for timestamp, stake in stamped:
        running += stake
        if 2 * running >= total:
            return timestamp
    raise InvalidVote("commit: no signatures")


def validate_equivocation(
    first: Proposal | Vote, second: Proposal | Vote, validators: ValidatorSet, domain: Domain
) -> bytes:
    """Two messages one validator signed for the same height, round and type
    with different content (two prevotes, two precommits or two proposals);
    returns the offender."""
    if isinstance(first, Vote) and isinstance(second, Vote):
        if (first.validator, first.height, first.round, first.kind) != (
            second.validator,
            second.height,
            second.round,
            second.kind,
        ):
            raise InvalidVote("evidence: not one validator's votes of one kind in one round")
        validate_vote(first, validators, domain)
        validate_vote(second, validators, domain)
    elif isinstance(first, Proposal) and isinstance(second, Proposal):
        if (first.proposer, first.height, first.round) != (second.proposer, second.height, second.round):
            raise InvalidVote("evidence: not one proposer's proposals in one round")
        if first.proposer not in validators.stakes:
            raise InvalidVote(f"evidence: {first.proposer.hex()[:16]} is not a validator")
        for proposal in (first, second):
            if not proposal.is_signed_by_proposer(domain):
                raise InvalidVote("evidence: a proposal is not its proposer's signature")
    else:
        raise InvalidVote("evidence: a proposal and a vote do not conflict")
    if _same_content(first, second):
        raise InvalidVote("evidence: the two messages agree")
    return first.validator if isinstance(first, Vote) else first.proposer
