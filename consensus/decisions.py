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
from dataclasses import replace

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


def compute_decided_rewards(genesis: Genesis, miner: bytes | None, signers: Mapping[bytes, int]) -> tuple[Reward, ...]:
    """The miner of a confirmed update (None: no update confirmed) gets
    miner_share_percent of the block reward; the parent's commit signers split
    the rest in proportion to the stake they signed with (rounded down; the
    remainder, and the miner's share when no update is confirmed, are not
    minted). Miner first, then signers by address; no zero amounts."""
    parameters = genesis.consensus
    miner_reward = parameters.block_reward * parameters.miner_share_percent // 100
    pool = parameters.block_reward - miner_reward
    signing_stake = sum(signers.values())
    rewards = [Reward(miner, miner_reward)] if miner is not None and miner_reward else []
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
    """Sorts the applied update first: committed before uncommitted (a copy cannot have been
    committed in time), then the larger test gain, then the smaller hash."""
    return (not committed, -gain, training_hash)


def apply_training_verdicts(
    state: State,
    parent: Block,
    proposer: bytes,
    body: DecidedBody,
    training_blocks: Mapping[bytes, Block],
    chain: Chain,
) -> tuple[State, Block | None]:
    """The named training blocks' held-out test (section 17): returns the state with the
    best update applied and its shard's revealed sequences marked, and the applied block."""
    if not body.training:
        if body.test is not None:
            raise InvalidBlock("test: a held-out test without a training block to test")
        return state, None
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
    before = chain.loss_on(state, sequences)
    if body.test.loss_before != before:
        raise InvalidBlock(f"test: loss_before {body.test.loss_before}, want {before}")
    best: tuple[tuple[bool, int, bytes], State, Block] | None = None
    for verdict in body.training:
        training = training_blocks[verdict.training_block]
        assert isinstance(training.body, TrainingBody)
        updated = state.with_slice(training.body.slice_id, training.body.weights)
        after = chain.loss_on(updated, sequences)
        if verdict.loss_after != after:
            raise InvalidBlock(f"training {training.hash.hex()[:16]}: loss_after {verdict.loss_after}, want {after}")
        gain = before - after
        rank = rank_verdict(is_committed(parent, training), gain, training.hash)
        if gain > 0 and (best is None or rank < best[0]):
            best = (rank, updated, training)
    record = state.heldout[proposer]
    heldout = dict(state.heldout)
    heldout[proposer] = replace(record, revealed=with_revealed(record.revealed, indices))
    if best is None:
        return replace(state, heldout=heldout), None
    return replace(best[1], heldout=heldout), best[2]


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
    updated, applied = apply_training_verdicts(state, parent, header.proposer, body, training_blocks, chain)
    miner = applied.header.proposer if applied is not None and is_committed(parent, applied) else None
    applied_hash = applied.hash if applied is not None else b""
    if body.applied != applied_hash:
        raise InvalidBlock(f"applied: got {body.applied.hex() or 'none'}, want {applied_hash.hex() or 'none'}")

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

    rewards = compute_decided_rewards(chain.genesis, miner, signers)
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
        finalized_hash=applied.hash
        if applied
        else body.training[0].training_block
        if body.training
        else state.finalized_hash,
        finalized_timestamp=clock,
    )


def compute_finalized_hash(state: State, body: DecidedBody, applied: Block | None) -> bytes:
    """The training block a decided block names last: the one it applies, else the first it names."""
    if applied is not None:
        return applied.hash
    return body.training[0].training_block if body.training else state.finalized_hash


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
    if test is not None:
        sequences = tuple(revealed.sequence for revealed in test.sequences)
        test = replace(test, loss_before=chain.loss_on(state, sequences))
        for block in training[:MAX_TRAINING_PER_HEIGHT]:
            assert isinstance(block.body, TrainingBody)
            updated = state.with_slice(block.body.slice_id, block.body.weights)
            verdicts += (TrainingVerdict(block.hash, chain.loss_on(updated, sequences)),)
    named = {block.hash: block for block in training}
    gains = {verdict.training_block: test.loss_before - verdict.loss_after for verdict in verdicts} if test else {}
    ranked = sorted((rank_verdict(is_committed(parent, named[h]), gain, h), h) for h, gain in gains.items() if gain > 0)
    applied = named[ranked[0][1]] if ranked else None
    miner = applied.header.proposer if applied is not None and is_committed(parent, applied) else None
    signers: dict[bytes, int] = {}
    if last_commit is not None and previous_validators is not None:
        signers = {validator: previous_validators.stakes[validator] for validator, _, _ in last_commit.signatures}
    height = parent.header.height + 1
    kept = tuple(c for c in commitments if c.height == height)[:MAX_COMMITMENTS]
    timestamp = compute_block_time(parent, last_commit, previous_validators)
    rewards = compute_decided_rewards(chain.genesis, miner, signers)
    body = DecidedBody(verdicts, test, kept, last_commit, evidence, rewards, applied.hash if applied else b"")
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
    new_state = compute_decided_state(state, parent, draft, named, previous_validators, chain)
    return sign_block(key, chain.domain, replace(unsigned, state_root=new_state.root), body)
