"""Decided blocks: the value one height's voting rounds decide (docs/spec.md, section 16).

`apply_decided_block(state, parent, block, training_blocks, previous_validators, chain)`
is the state transition of a decided block, pure like `consensus.rules.apply_training_block`:
it re-computes every number the block claims and returns the new state, or
raises `InvalidBlock` naming the rule. Everything in the block follows from
rules every validator checks identically:

- the training blocks it names (at most MAX_TRAINING_PER_HEIGHT, maybe none)
  are valid on the parent, and each one's verdict is its test gain on a batch
  seeded by the proposer's ECVRF output on the parent and the training block,
  which the proposer cannot choose (chain/vrf.py);
- it carries the parent's commit certificate, whose signers it pays, and its
  time is that certificate's stake-weighted median time;
- evidence slashes, and the payout and difficulty follow from the rules.

A height that names no training block is as final as one that does: the
chain, its rewards and its finality go on when no miner improves the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from chain import vrf
from chain.blocks import (
    MAX_COMMITMENTS,
    MAX_TRAINING_PER_HEIGHT,
    Block,
    DecidedBody,
    EquivocationEvidence,
    Header,
    HeldOutTest,
    Kind,
    RevealedSequence,
    Reward,
    TrainingBody,
    TrainingVerdict,
    UpdateCommitment,
    body_hash,
    compute_update_hash,
    sign_block,
)
from chain.crypto import PrivateKey
from chain.heldout import Shard, select_indices, sequence_leaf, verify_merkle_proof, with_revealed
from chain.state import Account, State
from chain.votes import Commit
from consensus.genesis import Genesis
from consensus.rules import Chain, InvalidBlock, apply_training_block, validate_header
from consensus.voting import (
    InvalidVote,
    ValidatorSet,
    compute_commit_time,
    validate_commit,
    validate_equivocation,
)


def get_validator_set(state: State, genesis: Genesis) -> ValidatorSet:
    """The validators who vote on the height after `state`'s block: every account with stake."""
    stakes = {address: account.stake for address, account in state.accounts.items() if account.stake > 0}
    parameters = genesis.consensus
    return ValidatorSet(stakes, parameters.quorum_numerator, parameters.quorum_denominator)


def compute_test_input(parent_hash: bytes) -> bytes:
    """The ECVRF input (alpha) of a decided block's held-out test: b"potchain/test" || parent."""
    return b"potchain/test" + parent_hash


def compute_test_seed(vrf_output: bytes) -> bytes:
    """The seed that picks the held-out sequences: sha256(b"potchain/test-seed" || the ECVRF output beta)."""
    return hashlib.sha256(b"potchain/test-seed" + vrf_output).digest()


def get_committed_updates(parent: Block) -> dict[bytes, bytes]:
    """The update each miner committed to in `parent` (a decided block): miner -> update hash."""
    if not isinstance(parent.body, DecidedBody):
        return {}
    return {commitment.miner: commitment.update_hash for commitment in parent.body.commitments}


def is_committed(parent: Block, training: Block) -> bool:
    """Whether the training block's update was committed in its parent by its miner."""
    body = training.body
    if not isinstance(body, TrainingBody):
        return False
    want = get_committed_updates(parent).get(training.header.proposer)
    return want == compute_update_hash(training.header.proposer, body.slice_id, body.weights)


def compute_decided_rewards(
    genesis: Genesis, miners: Mapping[bytes, int], signers: Mapping[bytes, int]
) -> tuple[Reward, ...]:
    """The miners of the committed updates a block applies (miner -> its update's own held-out
    gain; empty: none applied) split miner_share_percent of the block reward in proportion to
    those gains; the parent's commit signers split the rest in proportion to the stake they
    signed with. Amounts round down; remainders, and the miners' share when no committed update
    is applied, are not minted. Miners by address, then signers by address; no zero amounts."""
    parameters = genesis.consensus
    miner_pool = parameters.block_reward * parameters.miner_share_percent // 100 if miners else 0
    pool = parameters.block_reward - parameters.block_reward * parameters.miner_share_percent // 100
    rewards = []
    total_gain = sum(miners.values())
    for address in sorted(miners):
        amount = miner_pool * miners[address] // total_gain if total_gain > 0 else 0
        if amount:
            rewards.append(Reward(address, amount))
    signing_stake = sum(signers.values())
    for address in sorted(signers):
        amount = pool * signers[address] // signing_stake if signing_stake else 0
        if amount:
            rewards.append(Reward(address, amount))
    return tuple(rewards)


def compute_decided_difficulty(
    state: State, timestamp: int, decides_training: bool, genesis: Genesis
) -> tuple[int, int]:
    """(difficulty, clock start) after a decided block at `timestamp`.

    The clock (`state.finalized_timestamp`) runs from the last retarget. A
    height that decides a training block retargets from the time since: up
    by difficulty // divisor (at least 1) if faster than half the target
    interval, down by as much if slower than twice it. A height without one
    only lowers the difficulty, once more than twice the target interval has
    passed, so a network whose miners cannot meet it keeps lowering it."""
    parameters = genesis.consensus
    step = max(1, state.difficulty // parameters.retarget_divisor)
    interval = timestamp - state.finalized_timestamp
    target = parameters.target_interval_seconds
    if interval > 2 * target:
        return max(1, state.difficulty - step), timestamp
    if not decides_training:
        return state.difficulty, state.finalized_timestamp
    if interval < target // 2:
        return state.difficulty + step, timestamp
    return state.difficulty, timestamp


def validate_commitments(commitments: tuple[UpdateCommitment, ...], height: int, chain: Chain) -> None:
    """Each commitment is for this block's height, signed by its miner, one per miner."""
    miners: set[bytes] = set()
    for commitment in commitments:
        name = commitment.miner.hex()[:16]
        if commitment.height != height:
            raise InvalidBlock(f"commitments: {name}'s is for height {commitment.height}, want {height}")
        if not commitment.is_signed_by_miner(chain.domain):
            raise InvalidBlock(f"commitments: {name}'s signature is not its miner's")
        if commitment.miner in miners:
            raise InvalidBlock(f"commitments: {name} commits twice")
        miners.add(commitment.miner)


def validate_heldout_test(
    state: State, parent: Block, proposer: bytes, test: HeldOutTest, chain: Chain
) -> tuple[int, ...]:
    """The proposer's held-out test: the sequences its ECVRF output picks from its shard's
    unrevealed ones, each proven against its commitment. Returns their indices."""
    record = state.heldout.get(proposer)
    if record is None:
        raise InvalidBlock("test: the proposer committed no held-out shard")
    output = vrf.verify(proposer, test.vrf_proof, compute_test_input(parent.hash))
    if output is None:
        raise InvalidBlock("test: vrf_proof is not the proposer's proof for this parent")
    wanted = chain.genesis.evaluation.test_sequences
    indices = select_indices(compute_test_seed(output), record.revealed, record.sequences, wanted)
    if indices is None:
        raise InvalidBlock(f"test: the proposer's shard has fewer than {wanted} unrevealed sequences")
    got = tuple(revealed.index for revealed in test.sequences)
    if got != indices:
        raise InvalidBlock(f"test: sequences {_indices(got)}, want {_indices(indices)} (picked by the vrf output)")
    length = chain.genesis.model.context + 1
    for revealed in test.sequences:
        if len(revealed.sequence) != length:
            raise InvalidBlock(f"test: sequence {revealed.index} has {len(revealed.sequence)} bytes, want {length}")
        leaf = sequence_leaf(revealed.sequence)
        if len(revealed.proof) % 32 or not verify_merkle_proof(
            record.root, record.sequences, revealed.index, leaf, revealed.siblings
        ):
            raise InvalidBlock(f"test: sequence {revealed.index}: its Merkle proof does not match the commitment")
    return indices


def _indices(indices: tuple[int, ...]) -> str:
    shown = ", ".join(str(i) for i in indices[:4])
    return f"[{shown}{', ...' if len(indices) > 4 else ''}] ({len(indices)})"


def validate_training_verdict(
    state: State, parent: Block, verdict: TrainingVerdict, training: Block | None, chain: Chain
) -> None:
    """One named training block: valid on the parent (section 8)."""
    name = verdict.training_block.hex()[:16]
    if training is None or training.hash != verdict.training_block:
        raise InvalidBlock(f"training {name}: unknown training block")
    if training.header.kind != Kind.TRAINING or not isinstance(training.body, TrainingBody):
        raise InvalidBlock(f"training {name}: not a training block")
    if training.header.parent != parent.hash:
        raise InvalidBlock(f"training {name}: built on {training.header.parent.hex()[:16]}, not the parent")
    apply_training_block(state, parent, training, chain)


def rank_verdict(committed: bool, gain: int, training_hash: bytes) -> tuple[bool, int, bytes]:
    """Sorts the updates a block may apply: committed before uncommitted (a copy cannot have
    been committed in time), then the larger test gain, then the smaller hash."""
    return (not committed, -gain, training_hash)


def combine_updates(state: State, updates: Sequence[TrainingBody]) -> State:
    """`state` with every slice the updates set replaced by the mean of the values they set it
    to, rounded half up in integers (floor((2 * sum + n) / (2 * n)) for n updates of the slice);
    updates of different slices apply side by side, and the other slices keep their values."""
    by_slice: dict[int, list[bytes]] = {}
    for body in updates:
        by_slice.setdefault(body.slice_id, []).append(body.weights)
    for slice_id, contents in sorted(by_slice.items()):
        if len(contents) > 1:
            count = len(contents)
            total = np.sum([np.frombuffer(c, dtype="<i2").astype(np.int64) for c in contents], axis=0)
            contents = [((2 * total + count) // (2 * count)).astype("<i2").tobytes()]
        state = state.with_slice(slice_id, contents[0])
    return state


@dataclass(frozen=True)
class HeldOutOutcome:
    """What a held-out test decides about the training blocks a decided block names."""

    loss_before: int
    """The parent state's loss total on the revealed sequences."""
    losses: dict[bytes, int]
    """Each named training block's loss total with its update alone applied, by hash."""
    applied: tuple[Block, ...]
    """The training blocks whose updates are applied, combined, best-ranked first."""
    state: State
    """The state with them applied (the parent's model when none is)."""
    loss_after: int
    """The loss total of that state's model on the revealed sequences."""
    committed: frozenset[bytes] = frozenset()
    """The named training blocks committed in the parent, by hash (each update hashed once)."""

    def gain_of(self, training: Block) -> int:
        return self.loss_before - self.losses[training.hash]


def compute_heldout_outcome(
    state: State, parent: Block, training: Sequence[Block], sequences: Sequence[bytes], chain: Chain
) -> HeldOutOutcome:
    """Tests each training block's update alone on the sequences, then picks what to apply:
    of the committed updates that gain, ranked by `rank_verdict`, the best-ranked 1, 2, ...
    of them combined (`combine_updates`), whichever combination loses least (the fewest
    updates on a tie); an uncommitted update only alone, and only when no committed one
    gains. Evaluations: one before, one per block, one per combination of two or more."""
    before = chain.loss_on(state, sequences)
    losses: dict[bytes, int] = {}
    for block in training:
        assert isinstance(block.body, TrainingBody)
        losses[block.hash] = chain.loss_on(state.with_slice(block.body.slice_id, block.body.weights), sequences)
    committed_hashes = frozenset(block.hash for block in training if is_committed(parent, block))
    gaining = sorted(
        (rank_verdict(block.hash in committed_hashes, before - losses[block.hash], block.hash), index)
        for index, block in enumerate(training)
        if before - losses[block.hash] > 0
    )
    if not gaining:
        return HeldOutOutcome(before, losses, (), state, before, committed_hashes)
    ranked = [training[index] for _, index in gaining]
    best = ranked[0]
    assert isinstance(best.body, TrainingBody)
    applied: tuple[Block, ...] = (best,)
    updated = state.with_slice(best.body.slice_id, best.body.weights)
    after = losses[best.hash]
    committed = [block for block in ranked if block.hash in committed_hashes]
    for count in range(2, len(committed) + 1):
        bodies = [block.body for block in committed[:count] if isinstance(block.body, TrainingBody)]
        combined = combine_updates(state, bodies)
        loss = chain.loss_on(combined, sequences)
        if loss < after:
            applied, updated, after = tuple(committed[:count]), combined, loss
    return HeldOutOutcome(before, losses, applied, updated, after, committed_hashes)


def apply_training_verdicts(
    state: State,
    parent: Block,
    proposer: bytes,
    body: DecidedBody,
    training_blocks: Mapping[bytes, Block],
    chain: Chain,
) -> tuple[State, tuple[Block, ...], HeldOutOutcome | None]:
    """The named training blocks' held-out test (sections 17 and 18): returns the state with
    the chosen updates applied and its shard's revealed sequences marked, the applied blocks,
    and the test's outcome (None when the block names no training block)."""
    if not body.training:
        if body.test is not None:
            raise InvalidBlock("test: a held-out test without a training block to test")
        return state, (), None
    if body.test is None:
        raise InvalidBlock("test: training blocks named without a held-out test")
    if len(body.training) > MAX_TRAINING_PER_HEIGHT:
        raise InvalidBlock(f"training: {len(body.training)} training blocks, at most {MAX_TRAINING_PER_HEIGHT}")
    if len({verdict.training_block for verdict in body.training}) != len(body.training):
        raise InvalidBlock("training: a training block named twice")
    for verdict in body.training:
        validate_training_verdict(state, parent, verdict, training_blocks.get(verdict.training_block), chain)
    indices = validate_heldout_test(state, parent, proposer, body.test, chain)
    sequences = tuple(revealed.sequence for revealed in body.test.sequences)
    named = [training_blocks[verdict.training_block] for verdict in body.training]
    outcome = compute_heldout_outcome(state, parent, named, sequences, chain)
    if body.test.loss_before != outcome.loss_before:
        raise InvalidBlock(f"test: loss_before {body.test.loss_before}, want {outcome.loss_before}")
    for verdict in body.training:
        want = outcome.losses[verdict.training_block]
        if verdict.loss_after != want:
            raise InvalidBlock(
                f"training {verdict.training_block.hex()[:16]}: loss_after {verdict.loss_after}, want {want}"
            )
    if body.test.loss_after != outcome.loss_after:
        raise InvalidBlock(
            f"test: loss_after {body.test.loss_after}, want {outcome.loss_after} (the applied updates combined)"
        )
    record = state.heldout[proposer]
    heldout = dict(state.heldout)
    heldout[proposer] = replace(record, revealed=with_revealed(record.revealed, indices))
    return replace(outcome.state, heldout=heldout), outcome.applied, outcome


def get_paid_miners(parent: Block, outcome: HeldOutOutcome | None) -> dict[bytes, int]:
    """The miners a block pays: of the updates it applies, those committed in the parent, with
    their own held-out gains (an uncommitted update applied alone pays no one)."""
    if outcome is None:
        return {}
    paid = [block for block in outcome.applied if block.hash in outcome.committed]
    return {block.header.proposer: outcome.gain_of(block) for block in paid}


def apply_decided_block(
    state: State,
    parent: Block,
    block: Block,
    training_blocks: Mapping[bytes, Block],
    previous_validators: ValidatorSet | None,
    chain: Chain,
) -> State:
    """The state after decided block `block` on `parent` (state `state`).

    `training_blocks` holds the training blocks it names; `previous_validators`
    is the validator set that voted on the parent's height (None when the
    parent is genesis)."""
    new_state = compute_decided_state(state, parent, block, training_blocks, previous_validators, chain)
    if block.header.state_root != new_state.root:
        raise InvalidBlock(f"state_root: got {block.header.state_root.hex()}, want {new_state.root.hex()}")
    return new_state


def compute_decided_state(
    state: State,
    parent: Block,
    block: Block,
    training_blocks: Mapping[bytes, Block],
    previous_validators: ValidatorSet | None,
    chain: Chain,
) -> State:
    """Every rule of a decided block but its state root; returns the state it leads to."""
    header, body = block.header, block.body
    if not isinstance(body, DecidedBody):
        raise InvalidBlock("body: a decided block needs a decided body")
    if parent.header.kind not in (Kind.GENESIS, Kind.DECIDED):
        raise InvalidBlock(f"parent: a decided block follows a decided block, not {parent.header.kind.name}")
    validate_header(parent.header, block, chain, same_time_allowed=True)
    if state.stake_of(header.proposer) <= 0:
        raise InvalidBlock("proposer: not a validator")

    signers = validate_last_commit(parent, body.last_commit, previous_validators, chain)
    block_time = compute_block_time(parent, body.last_commit, previous_validators)
    if header.timestamp != block_time:
        raise InvalidBlock(f"timestamp: got {header.timestamp}, want {block_time} (the parent's commit time)")

    validate_commitments(body.commitments, header.height, chain)
    updated, applied, outcome = apply_training_verdicts(state, parent, header.proposer, body, training_blocks, chain)
    applied_hashes = tuple(block.hash for block in applied)
    if body.applied != applied_hashes:
        raise InvalidBlock(f"applied: got {_hashes(body.applied)}, want {_hashes(applied_hashes)}")

    accounts = dict(updated.accounts)
    slashed: set[bytes] = set()
    validators = get_validator_set(state, chain.genesis)
    for evidence in body.evidence:
        try:
            offender = validate_equivocation(evidence.first, evidence.second, validators, chain.domain)
        except InvalidVote as error:
            raise InvalidBlock(str(error)) from None
        if offender in slashed:
            raise InvalidBlock(f"evidence: {offender.hex()[:16]} slashed twice")
        slashed.add(offender)
        accounts[offender] = replace(accounts[offender], stake=0)

    rewards = compute_decided_rewards(chain.genesis, get_paid_miners(parent, outcome), signers)
    if body.rewards != rewards:
        got = ", ".join(f"{r.address.hex()[:16]}:{r.amount}" for r in body.rewards)
        want = ", ".join(f"{r.address.hex()[:16]}:{r.amount}" for r in rewards)
        raise InvalidBlock(f"rewards: got [{got}], want [{want}]")
    for reward in rewards:
        account = accounts.get(reward.address, Account(0, 0))
        accounts[reward.address] = replace(account, balance=account.balance + reward.amount)

    difficulty, clock = compute_decided_difficulty(state, header.timestamp, bool(body.training), chain.genesis)
    return replace(
        updated,
        accounts=accounts,
        difficulty=difficulty,
        finalized_height=header.height,
        finalized_hash=compute_finalized_hash(state, body),
        finalized_timestamp=clock,
    )


def compute_finalized_hash(state: State, body: DecidedBody) -> bytes:
    """The training block a decided block names last: the best-ranked it applies, else the
    first it names (the parent's when it names none)."""
    if body.applied:
        return body.applied[0]
    return body.training[0].training_block if body.training else state.finalized_hash


def _hashes(hashes: tuple[bytes, ...]) -> str:
    return "[" + ", ".join(h.hex()[:16] for h in hashes) + "]" if hashes else "none"


def compute_block_time(parent: Block, last_commit: Commit | None, previous_validators: ValidatorSet | None) -> int:
    """The timestamp the decided block after `parent` carries: its parent's commit
    time (`compute_commit_time`), or the parent's timestamp + 1 after genesis (no
    commit, and no proposer's clock to trust). Honest validators stamp their
    votes no earlier than the time of the block they vote on, so it never falls
    (and never runs ahead of their clocks when heights come faster than seconds)."""
    if last_commit is None or previous_validators is None:
        return parent.header.timestamp + 1
    return compute_commit_time(last_commit, previous_validators)


def validate_last_commit(
    parent: Block, commit: Commit | None, previous_validators: ValidatorSet | None, chain: Chain
) -> dict[bytes, int]:
    """The parent's commit certificate (none after genesis); returns its signers' stakes."""
    if parent.header.kind == Kind.GENESIS:
        if commit is not None:
            raise InvalidBlock("last_commit: the block after genesis carries none")
        return {}
    if commit is None or previous_validators is None:
        raise InvalidBlock("last_commit: missing the parent's commit certificate")
    if (commit.height, commit.block_hash) != (parent.header.height, parent.hash):
        raise InvalidBlock(
            f"last_commit: for height {commit.height} block {commit.block_hash.hex()[:16]}, "
            f"want {parent.header.height} {parent.hash.hex()[:16]}"
        )
    try:
        validate_commit(commit, previous_validators, chain.domain)
    except InvalidVote as error:
        raise InvalidBlock(f"last_{error}") from None
    return {validator: previous_validators.stakes[validator] for validator, _, _ in commit.signatures}


def build_heldout_test(chain: Chain, parent: Block, state: State, key: PrivateKey, shard: Shard) -> HeldOutTest | None:
    """The held-out test validator `key` reveals on `parent` from its shard (no loss yet),
    or None when its shard is not the one it committed to, or is spent."""
    record = state.heldout.get(key.public_key)
    if record is None or (record.root, record.sequences) != (shard.root, shard.count):
        return None
    proof = key.prove_vrf(compute_test_input(parent.hash))
    seed = compute_test_seed(vrf.proof_to_hash(proof))
    indices = select_indices(seed, record.revealed, record.sequences, chain.genesis.evaluation.test_sequences)
    if indices is None:
        return None
    revealed = tuple(RevealedSequence(i, shard.sequences[i], b"".join(shard.proof(i))) for i in indices)
    return HeldOutTest(proof, 0, revealed)


def propose_decided_block(
    chain: Chain,
    parent: Block,
    state: State,
    key: PrivateKey,
    training: Sequence[Block],
    last_commit: Commit | None,
    previous_validators: ValidatorSet | None,
    evidence: tuple[EquivocationEvidence, ...],
    shard: Shard | None = None,
    commitments: Sequence[UpdateCommitment] = (),
) -> Block:
    """A decided block by validator `key` on `parent` (state `state`) that tests the
    `training` blocks (at most MAX_TRAINING_PER_HEIGHT) on held-out sequences of its
    `shard` (none are named without a shard that matches its commitment and is not
    spent), carries `commitments` for the next reveals, at the time `compute_block_time` fixes."""
    verdicts: tuple[TrainingVerdict, ...] = ()
    test = build_heldout_test(chain, parent, state, key, shard) if training and shard is not None else None
    outcome: HeldOutOutcome | None = None
    applied: tuple[bytes, ...] = ()
    if test is not None:
        named = list(training[:MAX_TRAINING_PER_HEIGHT])
        sequences = tuple(revealed.sequence for revealed in test.sequences)
        outcome = compute_heldout_outcome(state, parent, named, sequences, chain)
        test = replace(test, loss_before=outcome.loss_before, loss_after=outcome.loss_after)
        verdicts = tuple(TrainingVerdict(block.hash, outcome.losses[block.hash]) for block in named)
        applied = tuple(block.hash for block in outcome.applied)
    named_blocks = {block.hash: block for block in training}
    signers: dict[bytes, int] = {}
    if last_commit is not None and previous_validators is not None:
        signers = {validator: previous_validators.stakes[validator] for validator, _, _ in last_commit.signatures}
    height = parent.header.height + 1
    kept = tuple(c for c in commitments if c.height == height)[:MAX_COMMITMENTS]
    timestamp = compute_block_time(parent, last_commit, previous_validators)
    rewards = compute_decided_rewards(chain.genesis, get_paid_miners(parent, outcome), signers)
    body = DecidedBody(verdicts, test, kept, last_commit, evidence, rewards, applied)
    unsigned = Header(
        chain_id=chain.genesis.chain_id,
        height=height,
        parent=parent.hash,
        kind=Kind.DECIDED,
        timestamp=timestamp,
        proposer=key.public_key,
        state_root=bytes(32),
        body_hash=body_hash(body),
    )
    draft = sign_block(key, chain.domain, unsigned, body)
    new_state = compute_decided_state(state, parent, draft, named_blocks, previous_validators, chain)
    return sign_block(key, chain.domain, replace(unsigned, state_root=new_state.root), body)
