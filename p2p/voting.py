"""A node's voting: the voting machines of its validator keys, fed every message, their actions carried out.

`NodeVoting` sits between the pure voting machine (consensus/voting.py) and
the node's transport. For the height being decided it runs one
`HeightVoting` per validator key the node holds (a node with none runs one
that only follows), checks every incoming proposal, vote and commit
certificate (signature, sender's stake) before any machine sees it, and
turns the machines' actions into effects the transport carries out:

- `Send`: a message to gossip, signed only after the key's signer state was
  saved to disk (p2p/signer.py), so a restart never signs a conflicting one,
  and, for a proposal or vote for a block, after the block was kept on disk
  (`keep_signed`), so a restart never loses the block a key is locked on;
- `SetTimer`: call `on_timeout` later;
- `CheckCandidate`: fetch a proposed block (and the training blocks it names)
  and check it with `DecidedChain.on_candidate`, then call `on_block_checked`;
- `BuildBlock`: this key proposes: build a block (`build_block` does it),
  then call `on_value`;
- `Decided`: the height is decided (already applied to the decided chain):
  persist it, then the next height's voting has started.

It is synchronous and does no network I/O; the trio side runs the effects.
Messages for the next height wait (a bounded number) until it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from chain.blocks import Block, EquivocationEvidence
from chain.crypto import PrivateKey
from chain.heldout import Shard
from chain.votes import Commit, Proposal, Vote, VoteKind, sign_proposal, sign_vote
from consensus.decided_chain import DecidedChain, Decision
from consensus.decisions import compute_block_time, propose_decided_block
from consensus.voting import (
    Action,
    Broadcast,
    CheckBlock,
    Decide,
    Equivocation,
    HeightVoting,
    InvalidVote,
    ProposeValue,
    ScheduleTimeout,
    Timeout,
    TimeoutParameters,
    validate_commit,
    validate_equivocation,
    validate_proposal,
    validate_vote,
)
from p2p.signer import SignerRecord

MAX_WAITING = 4096
"""Messages for the next height kept until it starts."""


@dataclass(frozen=True)
class Send:
    """Gossip this signed message."""

    message: Proposal | Vote | Commit


@dataclass(frozen=True)
class SetTimer:
    """Call `on_timeout(validator, timeout)` after `milliseconds`."""

    validator: bytes | None
    timeout: Timeout
    milliseconds: int


@dataclass(frozen=True)
class CheckCandidate:
    """Fetch this block (and the training blocks it names), check it, call `on_block_checked`."""

    block_hash: bytes


@dataclass(frozen=True)
class BuildBlock:
    """Key `validator` proposes at (height, round): `build_block`, then `on_value`."""

    validator: bytes
    height: int
    round: int


@dataclass(frozen=True)
class Decided:
    """A height was decided (the decided chain's head moved): persist it."""

    decision: Decision


Effect = Send | SetTimer | CheckCandidate | BuildBlock | Decided


@dataclass
class NodeVoting:
    """See the module docstring."""

    decided: DecidedChain
    keys: dict[bytes, PrivateKey]
    """The node's validator keys by public key."""
    record: SignerRecord
    timeouts: TimeoutParameters
    keep_signed: Callable[[bytes], None]
    """Called with a block's hash before a key of ours signs a proposal or vote for it: keeps the
    block and the training blocks it names on disk (`DecidedNode.keep_signed`), so that after a
    restart a key locked on it still holds it. If it raises (StorageError), nothing is signed."""
    machines: dict[bytes | None, HeightVoting] = field(default_factory=dict)
    """The machines of the height being decided: one per staked key of ours (None: a follower)."""
    waiting: list[Proposal | Vote | Commit] = field(default_factory=list)
    """Messages for the next height."""
    evidence: dict[bytes, EquivocationEvidence] = field(default_factory=dict)
    """Equivocations seen and not yet in a decided block, by offender."""
    signed: list[Proposal | Vote] = field(default_factory=list)
    """Every message our keys signed at this height (gossip re-sends them: see `resend`)."""
    own_precommits: dict[tuple[bytes, int], Vote] = field(default_factory=dict)
    """Our signed precommits at this height by (validator, round): the machines keep
    our messages unsigned, and a commit certificate needs the signatures."""
    time: int = 0
    shards: dict[bytes, Shard] = field(default_factory=dict)
    """Our validator keys' private held-out shards by public key: a proposal tests training
    blocks only with its key's shard (docs/spec.md, section 17)."""

    @property
    def height(self) -> int:
        return self.decided.height

    # --- events -----------------------------------------------------------------

    def start(self, now: int) -> list[Effect]:
        """Start (or, after a restart, resume) voting on the next height."""
        self.time = max(self.time, now)
        validators = self.decided.validators()
        self.machines = {}
        ours: list[bytes | None] = [key for key in self.keys if key in validators.stakes]
        for key in ours or [None]:
            saved = self.record.load(key) if key is not None else None
            if key is not None and saved is not None and saved.height == self.height:
                machine = HeightVoting.resume(saved, validators, self.timeouts, key)
            else:
                machine = HeightVoting(self.height, validators, self.timeouts, key)
            self.machines[key] = machine
        effects: list[Effect] = []
        for owner, machine in list(self.machines.items()):
            machine.on_tick(self._vote_time())
            effects += self._carry_out(owner, machine.start())
            if self._moved_on(effects):
                return effects
        waiting, self.waiting = self.waiting, []
        for message in waiting:
            effects += self.on_message(message)
        return effects

    def on_message(self, message: Proposal | Vote | Commit) -> list[Effect]:
        """A message from the network (raises InvalidVote for an invalid one at this height)."""
        if message.height < self.height:
            return []
        if message.height > self.height:
            if message.height == self.height + 1 and len(self.waiting) < MAX_WAITING:
                self.waiting.append(message)
            return []
        validators = self.decided.validators()
        if isinstance(message, Commit):
            validate_commit(message, validators, self.decided.chain.domain)
            return self._feed(lambda machine: machine.on_commit(message))
        if isinstance(message, Proposal):
            validate_proposal(message, validators, self.decided.chain.domain)
            return self._feed(lambda machine: machine.on_proposal(message))
        validate_vote(message, validators, self.decided.chain.domain)
        return self._feed(lambda machine: machine.on_vote(message))

    def on_block_checked(self, block_hash: bytes, valid: bool) -> list[Effect]:
        return self._feed(lambda machine: machine.on_block_checked(block_hash, valid))

    def on_value(self, validator: bytes, round: int, block: Block) -> list[Effect]:
        """The block key `validator` built for its turn (already a checked candidate)."""
        machine = self.machines.get(validator)
        if machine is None or block.header.height != self.height:
            return []
        effects = self._carry_out(validator, machine.on_value(round, block.hash))
        if self._moved_on(effects):
            return effects
        return effects + self._feed(lambda other: other.on_block_checked(block.hash, True), skip=validator)

    def on_timeout(self, validator: bytes | None, timeout: Timeout) -> list[Effect]:
        machine = self.machines.get(validator)
        if machine is None or timeout.height != self.height:
            return []
        machine.on_tick(self._vote_time())
        return self._carry_out(validator, machine.on_timeout(timeout))

    def on_tick(self, now: int) -> None:
        """The node's clock (Unix seconds): for vote timestamps and the decided chain's future-time rule."""
        self.time = max(self.time, now)
        self.decided.on_tick(now)

    def resend(self) -> list[Effect]:
        """Our messages of the latest two rounds at this height, to gossip again: a
        peer that missed them (it restarted, or gossip lost them) still counts them."""
        latest = max((message.round for message in self.signed), default=0)
        return [Send(message) for message in self.signed if message.round >= latest - 1]

    # --- building ---------------------------------------------------------------

    def build_block(self, validator: bytes) -> Block:
        """The block key `validator` proposes: the training blocks on the head it tests on
        its held-out shard (none without one), the commitments, the head's commit and the
        evidence held; checked as a candidate."""
        head = self.decided.head
        shard = self.shards.get(validator)
        training = self.decided.get_training_candidates() if shard is not None else []
        state = head.state
        stakes = state.accounts
        evidence = tuple(e for offender, e in sorted(self.evidence.items()) if stakes.get(offender) and
                         stakes[offender].stake > 0)  # fmt: skip
        block = propose_decided_block(
            self.decided.chain, head.block, state, self.keys[validator], training, head.commit,
            self.decided.head_validators, evidence, shard, list(self.decided.commitments.values()),
        )  # fmt: skip
        self.decided.on_candidate(block, {b.hash: b for b in training})
        return block

    # --- internals ----------------------------------------------------------------

    def _vote_time(self) -> int:
        """Our clock, but no earlier than the time of the block being decided, so block times never fall."""
        head = self.decided.head
        return max(self.time, compute_block_time(head.block, head.commit, self.decided.head_validators))

    def _feed(self, event: Callable[[HeightVoting], list[Action]], skip: bytes | None = None) -> list[Effect]:
        """Give an event to every machine of this height; stop if the height is decided."""
        effects: list[Effect] = []
        height = self.height
        for key, machine in list(self.machines.items()):
            if key == skip and key is not None:
                continue
            machine.on_tick(self._vote_time())
            effects += self._carry_out(key, event(machine))
            if self.height != height:
                break
        return effects

    def _moved_on(self, effects: list[Effect]) -> bool:
        return any(isinstance(effect, Decided) for effect in effects)

    def _carry_out(self, key: bytes | None, actions: list[Action]) -> list[Effect]:
        effects: list[Effect] = []
        machine = self.machines.get(key)
        # Sign every message first: feeding one to our other keys' machines can decide the
        # height on this machine's later vote, which the certificate must carry signed.
        signed_messages: dict[int, Proposal | Vote] = {}
        for index, action in enumerate(actions):
            if isinstance(action, Broadcast):
                assert key is not None and machine is not None
                signed_messages[index] = self._sign(key, machine, action.message)
        for index, action in enumerate(actions):
            if isinstance(action, Broadcast):
                signed = signed_messages[index]
                effects.append(Send(signed))
                # Our other keys on this node see our message as peers would.
                for other, other_machine in self.machines.items():
                    if other != key:
                        feed = (
                            other_machine.on_proposal(signed)
                            if isinstance(signed, Proposal)
                            else other_machine.on_vote(signed)
                        )
                        effects += self._carry_out(other, feed)
                        if self._moved_on(effects):
                            return effects
            elif isinstance(action, ProposeValue):
                assert key is not None
                effects.append(BuildBlock(key, action.height, action.round))
            elif isinstance(action, CheckBlock):
                if action.block_hash in self.decided.candidates:
                    known = self.decided.candidates[action.block_hash] is not None
                    effects += self.on_block_checked(action.block_hash, known)
                elif CheckCandidate(action.block_hash) not in effects:
                    effects.append(CheckCandidate(action.block_hash))
            elif isinstance(action, ScheduleTimeout):
                effects.append(SetTimer(key, action.timeout, action.milliseconds))
            elif isinstance(action, Decide):
                effects += self._decide(action.commit)
                return effects
            elif isinstance(action, Equivocation):
                self._keep_evidence(action)
        return effects

    def _sign(self, key: bytes, machine: HeightVoting, message: Proposal | Vote) -> Proposal | Vote:
        if message.block_hash is not None:
            self.keep_signed(message.block_hash)
        self.record.save_before_signing(key, machine.signer_state(), message)
        domain = self.decided.chain.domain
        signed: Proposal | Vote
        if isinstance(message, Proposal):
            signed = sign_proposal(self.keys[key], domain, message)
        else:
            signed = sign_vote(self.keys[key], domain, message)
            if signed.kind == VoteKind.PRECOMMIT:
                self.own_precommits[(key, signed.round)] = signed
        if signed not in self.signed:
            self.signed.append(signed)
        return signed

    def _keep_evidence(self, action: Equivocation) -> None:
        try:
            offender = validate_equivocation(
                action.first, action.second, self.decided.validators(), self.decided.chain.domain
            )
        except InvalidVote:
            return  # one of the two is our own unsigned copy: not evidence we can show
        self.evidence.setdefault(offender, EquivocationEvidence(action.first, action.second))

    def _decide(self, commit: Commit) -> list[Effect]:
        candidate = self.decided.candidate_blocks.get(commit.block_hash)
        assert candidate is not None, "a machine decides only a block the node checked"
        signatures = []
        for validator, timestamp, signature in commit.signatures:
            own = self.own_precommits.get((validator, commit.round))
            signatures.append((validator, timestamp, own.signature if own is not None and not signature else signature))
        commit = replace(commit, signatures=tuple(signatures))
        decision = self.decided.on_decided(candidate[0], commit)
        self.own_precommits.clear()
        self.signed.clear()
        for offender in [o for o in self.evidence if decision.state.stake_of(o) <= 0]:
            del self.evidence[offender]
        effects: list[Effect] = [Decided(decision), Send(commit)]
        return effects + self.start(self.time)
