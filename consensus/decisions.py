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
from collections.abc import Mapping
from dataclasses import replace

from chain import vrf
from chain.blocks import (
    MAX_TRAINING_PER_HEIGHT,
    Block,
    DecidedBody,
    EquivocationEvidence,
    Header,
    Kind,
    Reward,
    TrainingBody,
    TrainingVerdict,
    body_hash,
    sign_block,
)
from chain.crypto import PrivateKey
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


def compute_test_input(parent_hash: bytes, training_hash: bytes) -> bytes:
    """The ECVRF input (alpha) of a training block's test: b"potchain/test" || parent || training block."""
    return b"potchain/test" + parent_hash + training_hash


def compute_test_seed(vrf_output: bytes) -> bytes:
    """The test batch seed: sha256(b"potchain/test-seed" || the ECVRF output beta)."""
    return hashlib.sha256(b"potchain/test-seed" + vrf_output).digest()


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


def validate_training_verdict(
    state: State, parent: Block, proposer: bytes, verdict: TrainingVerdict, training: Block | None, chain: Chain
) -> State:
    """One named training block: valid on the parent, its test seeded by the proposer's
    ECVRF output, its test losses the canonical ones. Returns the state with its update."""
    name = verdict.training_block.hex()[:16]
    if training is None or training.hash != verdict.training_block:
        raise InvalidBlock(f"training {name}: unknown training block")
    if training.header.kind != Kind.TRAINING or not isinstance(training.body, TrainingBody):
        raise InvalidBlock(f"training {name}: not a training block")
    if training.header.parent != parent.hash:
        raise InvalidBlock(f"training {name}: built on {training.header.parent.hex()[:16]}, not the parent")
    apply_training_block(state, parent, training, chain)
    output = vrf.verify(proposer, verdict.vrf_proof, compute_test_input(parent.hash, training.hash))
    if output is None:
        raise InvalidBlock(f"training {name}: vrf_proof is not the proposer's proof for this training block")
    seed = compute_test_seed(output)
    updated = state.with_slice(training.body.slice_id, training.body.weights)
    before = chain.loss(state, "test", seed)
    if verdict.loss_before != before:
        raise InvalidBlock(f"training {name}: loss_before {verdict.loss_before}, want {before}")
    after = chain.loss(updated, "test", seed)
    if verdict.loss_after != after:
        raise InvalidBlock(f"training {name}: loss_after {verdict.loss_after}, want {after}")
    return updated


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

    if len(body.training) > MAX_TRAINING_PER_HEIGHT:
        raise InvalidBlock(f"training: {len(body.training)} training blocks, at most {MAX_TRAINING_PER_HEIGHT}")
    updated, miner = state, None
    for verdict in body.training:
        training = training_blocks.get(verdict.training_block)
        with_update = validate_training_verdict(state, parent, header.proposer, verdict, training, chain)
        if verdict.gain > 0:
            assert training is not None
            updated, miner = with_update, training.header.proposer

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
        finalized_hash=body.training[-1].training_block if body.training else state.finalized_hash,
        finalized_timestamp=clock,
    )


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


def propose_decided_block(
    chain: Chain,
    parent: Block,
    state: State,
    key: PrivateKey,
    training: Block | None,
    last_commit: Commit | None,
    previous_validators: ValidatorSet | None,
    evidence: tuple[EquivocationEvidence, ...],
) -> Block:
    """A decided block by validator `key` on `parent` (state `state`), naming
    `training` (or none), at the time `compute_block_time` fixes."""
    verdicts: tuple[TrainingVerdict, ...] = ()
    miner = None
    if training is not None:
        assert isinstance(training.body, TrainingBody)
        proof = key.prove_vrf(compute_test_input(parent.hash, training.hash))
        seed = compute_test_seed(vrf.proof_to_hash(proof))
        updated = state.with_slice(training.body.slice_id, training.body.weights)
        verdict = TrainingVerdict(
            training.hash, proof, chain.loss(state, "test", seed), chain.loss(updated, "test", seed)
        )
        verdicts = (verdict,)
        miner = training.header.proposer if verdict.gain > 0 else None
    signers: dict[bytes, int] = {}
    if last_commit is not None and previous_validators is not None:
        signers = {validator: previous_validators.stakes[validator] for validator, _, _ in last_commit.signatures}
    timestamp = compute_block_time(parent, last_commit, previous_validators)
    body = DecidedBody(verdicts, last_commit, evidence, compute_decided_rewards(chain.genesis, miner, signers))
    unsigned = Header(
        chain_id=chain.genesis.chain_id,
        height=parent.header.height + 1,
        parent=parent.hash,
        kind=Kind.DECIDED,
        timestamp=timestamp,
        proposer=key.public_key,
        state_root=bytes(32),
        body_hash=body_hash(body),
    )
    training_blocks = {training.hash: training} if training is not None else {}
    draft = sign_block(key, chain.domain, unsigned, body)
    new_state = compute_decided_state(state, parent, draft, training_blocks, previous_validators, chain)
    return sign_block(key, chain.domain, replace(unsigned, state_root=new_state.root), body)
