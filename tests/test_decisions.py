"""Decided blocks (consensus/decisions.py): each rule is checked, each broken
rule is rejected with its reason, and a height without an update is decided
like any other."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from chain import vrf
from chain.blocks import Block, DecidedBody, EquivocationEvidence, Reward, decode_block
from chain.crypto import PrivateKey
from chain.state import State
from chain.votes import Commit, Vote, VoteKind, sign_vote
from consensus.decisions import (
    apply_decided_block,
    compute_decided_difficulty,
    compute_decided_rewards,
    compute_test_input,
    compute_test_seed,
    get_validator_set,
    propose_decided_block,
)
from consensus.rules import InvalidBlock
from consensus.voting import ValidatorSet
from tests.chain_builders import Scenario, devnet_test_shard, rebuild


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    scenario = Scenario.create(tmp_path_factory.mktemp("decisions"))
    yield scenario
    scenario.node.close()


@dataclasses.dataclass
class Decided:
    """Height 1 decided with a training block, and what height 2 needs."""

    genesis: Block
    genesis_state: State
    training: Block
    first: Block
    first_state: State
    commit: Commit
    validators: ValidatorSet


def precommits(scenario: Scenario, block: Block, keys: list[PrivateKey], times: list[int]) -> Commit:
    votes = [
        sign_vote(
            k, scenario.chain.domain, Vote(VoteKind.PRECOMMIT, block.header.height, 0, block.hash, t, k.public_key)
        )
        for k, t in zip(keys, times, strict=True)
    ]
    return Commit.of(votes)


@pytest.fixture(scope="module")
def decided(scenario: Scenario) -> Decided:
    genesis, state = scenario.genesis()
    training = scenario.valid_training_block(genesis, state)
    proposer = scenario.validators[0]
    first = propose_decided_block(
        scenario.chain, genesis, state, proposer, [training], None, None, (), devnet_test_shard(proposer.public_key)
    )
    first_state = apply_decided_block(state, genesis, first, {training.hash: training}, None, scenario.chain)
    now = first.header.timestamp
    commit = precommits(scenario, first, scenario.validators[:3], [now + 5, now + 7, now + 9])
    return Decided(
        genesis, state, training, first, first_state, commit, get_validator_set(state, scenario.node.genesis)
    )


def test_a_decided_block_with_a_training_block_applies_its_verdict(scenario: Scenario, decided: Decided) -> None:
    body = decided.first.body
    assert isinstance(body, DecidedBody) and len(body.training) == 1 and body.last_commit is None
    updated = body.gains()[decided.training.hash] > 0
    assert (decided.first_state.weights_root != decided.genesis_state.weights_root) == updated
    assert body.applied == ((decided.training.hash,) if updated else ())
    assert body.test is not None and body.test.loss_after == body.test.loss_before - max(
        0, body.gains()[decided.training.hash]
    )
    assert decided.first_state.finalized_height == 1 and decided.first_state.finalized_hash == decided.training.hash
    assert decode_block(decided.first.encode()) == decided.first
    # An update nobody committed to earns nothing (a commitment needs a decided block, and
    # genesis carries none); no commit after genesis, so no signer is paid either.
    assert body.rewards == ()


def test_a_height_without_an_update_is_decided_and_pays_the_commit_signers(
    scenario: Scenario, decided: Decided
) -> None:
    second = propose_decided_block(
        scenario.chain, decided.first, decided.first_state, scenario.validators[1], [], decided.commit,
        decided.validators, (),
    )  # fmt: skip
    state = apply_decided_block(decided.first_state, decided.first, second, {}, decided.validators, scenario.chain)
    body = second.body
    assert isinstance(body, DecidedBody) and body.training == ()
    assert second.header.timestamp == decided.first.header.timestamp + 7  # the commit's median time
    assert state.weights_root == decided.first_state.weights_root
    signers = sorted(k.public_key for k in scenario.validators[:3])
    assert [r.address for r in body.rewards] == signers
    pool = scenario.node.genesis.consensus.block_reward * (100 - scenario.node.genesis.consensus.miner_share_percent)
    assert sum(r.amount for r in body.rewards) == pool // 100 // 3 * 3


def test_the_proposer_cannot_choose_the_test_seed(scenario: Scenario, decided: Decided) -> None:
    """Another validator's proof (another seed) under this proposer's name is refused, and the seed
    of each validator differs: the proposer can only publish its own unique ECVRF output."""
    body = decided.first.body
    assert isinstance(body, DecidedBody)
    assert body.test is not None
    alpha = compute_test_input(decided.genesis.hash)
    other = scenario.validators[1].prove_vrf(alpha)
    assert compute_test_seed(vrf.proof_to_hash(other)) != compute_test_seed(vrf.proof_to_hash(body.test.vrf_proof))
    forged = dataclasses.replace(body, test=dataclasses.replace(body.test, vrf_proof=other))
    block = rebuild_decided(scenario, decided.first, forged)
    with pytest.raises(InvalidBlock, match="vrf_proof is not the proposer's proof"):
        apply_decided_block(
            decided.genesis_state, decided.genesis, block, {decided.training.hash: decided.training}, None,
            scenario.chain,
        )  # fmt: skip


def rebuild_decided(scenario: Scenario, block: Block, body: DecidedBody, **header: object) -> Block:
    signer = next(k for k in scenario.validators if k.public_key == block.header.proposer)
    return rebuild(Block(block.header, body, block.signature), signer, scenario.chain.domain, **header)


@pytest.mark.parametrize(
    "change, reason",
    [
        ("loss_before", "loss_before"),
        ("loss_after", "loss_after"),
        ("unknown_training", "unknown training block"),
        ("named_twice", "named twice"),
        ("no_test", "without a held-out test"),
        ("applied", "applied: got none"),
        ("applied_twice", r"applied: got \[[0-9a-f]{16}, [0-9a-f]{16}\], want \[[0-9a-f]{16}\]"),
        ("test_loss_after", "test: loss_after"),
        ("rewards", "rewards"),
        ("commit_after_genesis", "carries none"),
    ],
)
def test_each_rule_of_height_one(scenario: Scenario, decided: Decided, change: str, reason: str) -> None:
    body = decided.first.body
    assert isinstance(body, DecidedBody)
    verdict = body.training[0]
    assert body.test is not None
    training_blocks = {decided.training.hash: decided.training}
    if change == "loss_before":
        body = dataclasses.replace(body, test=dataclasses.replace(body.test, loss_before=body.test.loss_before + 1))
    elif change == "loss_after":
        body = dataclasses.replace(body, training=(dataclasses.replace(verdict, loss_after=verdict.loss_after + 1),))
    elif change == "unknown_training":
        training_blocks = {}
    elif change == "named_twice":
        body = dataclasses.replace(body, training=(verdict, verdict))
    elif change == "no_test":
        body = dataclasses.replace(body, test=None)
    elif change == "applied":
        assert body.applied, "the fixture's update is applied"
        body = dataclasses.replace(body, applied=())
    elif change == "applied_twice":
        assert body.applied, "the fixture's update is applied"
        body = dataclasses.replace(body, applied=body.applied * 2)
    elif change == "test_loss_after":  # the parent's loss, as if nothing were applied
        assert body.applied and body.test is not None, "the fixture's update is applied"
        body = dataclasses.replace(body, test=dataclasses.replace(body.test, loss_after=body.test.loss_before))
    elif change == "rewards":  # pays the miner of an update it did not commit to
        miner_share = scenario.node.genesis.consensus.block_reward * 70 // 100
        body = dataclasses.replace(body, rewards=(Reward(decided.training.header.proposer, miner_share),))
    elif change == "commit_after_genesis":
        body = dataclasses.replace(body, last_commit=decided.commit)
    block = rebuild_decided(scenario, decided.first, body)
    with pytest.raises(InvalidBlock, match=reason):
        apply_decided_block(decided.genesis_state, decided.genesis, block, training_blocks, None, scenario.chain)


@pytest.mark.parametrize("change, reason", [
    ("no_commit", "missing the parent's commit"),
    ("short_commit", "stake 2000000 of 4000000"),
    ("wrong_block", "last_commit: for height"),
    ("timestamp", "the parent's commit time"),
    ("state_root", "state_root"),
])  # fmt: skip
def test_each_rule_of_a_later_height(scenario: Scenario, decided: Decided, change: str, reason: str) -> None:
    second = propose_decided_block(
        scenario.chain, decided.first, decided.first_state, scenario.validators[1], [], decided.commit,
        decided.validators, (),
    )  # fmt: skip
    body = second.body
    assert isinstance(body, DecidedBody)
    header: dict[str, object] = {}
    if change == "no_commit":
        body = dataclasses.replace(body, last_commit=None)
    elif change == "short_commit":
        commit = decided.commit
        body = dataclasses.replace(body, last_commit=dataclasses.replace(commit, signatures=commit.signatures[:2]))
    elif change == "wrong_block":
        body = dataclasses.replace(body, last_commit=dataclasses.replace(decided.commit, block_hash=bytes(32)))
    elif change == "timestamp":
        header = {"timestamp": second.header.timestamp + 1}
    elif change == "state_root":
        header = {"state_root": bytes(32)}
    block = rebuild_decided(scenario, second, body, **header)
    with pytest.raises(InvalidBlock, match=reason):
        apply_decided_block(decided.first_state, decided.first, block, {}, decided.validators, scenario.chain)


def test_equivocation_evidence_slashes_once(scenario: Scenario, decided: Decided) -> None:
    offender = scenario.validators[2]
    domain = scenario.chain.domain
    votes = [
        sign_vote(offender, domain, Vote(VoteKind.PREVOTE, 2, 0, block_hash, 1, offender.public_key))
        for block_hash in (decided.first.hash, None)
    ]
    evidence = EquivocationEvidence(votes[0], votes[1])
    second = propose_decided_block(
        scenario.chain, decided.first, decided.first_state, scenario.validators[1], [], decided.commit,
        decided.validators, (evidence,),
    )  # fmt: skip
    state = apply_decided_block(decided.first_state, decided.first, second, {}, decided.validators, scenario.chain)
    assert state.stake_of(offender.public_key) == 0 and decided.first_state.stake_of(offender.public_key) > 0
    assert decode_block(second.encode()) == second
    body = second.body
    assert isinstance(body, DecidedBody)
    twice = rebuild_decided(scenario, second, dataclasses.replace(body, evidence=(evidence, evidence)))
    with pytest.raises(InvalidBlock, match="slashed twice"):
        apply_decided_block(decided.first_state, decided.first, twice, {}, decided.validators, scenario.chain)
    agreeing = EquivocationEvidence(votes[0], votes[0])
    bad = rebuild_decided(scenario, second, dataclasses.replace(body, evidence=(agreeing,)))
    with pytest.raises(InvalidBlock, match="agree"):
        apply_decided_block(decided.first_state, decided.first, bad, {}, decided.validators, scenario.chain)


def test_difficulty_falls_when_no_update_is_decided_for_long(scenario: Scenario, decided: Decided) -> None:
    genesis = scenario.node.genesis
    target = genesis.consensus.target_interval_seconds
    state = dataclasses.replace(decided.first_state, difficulty=100, finalized_timestamp=1000)
    assert compute_decided_difficulty(state, 1000 + target, False, genesis) == (100, 1000)  # no update: unchanged
    lower, clock = compute_decided_difficulty(state, 1001 + 2 * target, False, genesis)
    assert lower < 100 and clock == 1001 + 2 * target  # slower than twice the target: falls, clock restarts
    assert compute_decided_difficulty(state, 1000 + target // 2 - 1, True, genesis)[0] > 100  # fast updates: rises
    assert compute_decided_difficulty(state, 1000 + target, True, genesis) == (100, 1000 + target)


def test_difficulty_retarget_steps(scenario: Scenario) -> None:
    """A height that decides an update retargets by difficulty // divisor (at least 1); more than
    twice the target interval lowers it with or without one, never below 1."""
    genesis = scenario.node.genesis
    target = genesis.consensus.target_interval_seconds
    _, first = scenario.genesis()

    def retarget(difficulty: int, interval: int, decides_training: bool = True) -> tuple[int, int]:
        state = dataclasses.replace(first, difficulty=difficulty, finalized_timestamp=1000)
        return compute_decided_difficulty(state, 1000 + interval, decides_training, genesis)

    assert retarget(80, target // 2 - 1) == (90, 1000 + target // 2 - 1)  # fast: up by 80 // 8
    assert retarget(80, target) == (80, 1000 + target)
    assert retarget(80, 2 * target + 1) == retarget(80, 2 * target + 1, False) == (70, 1001 + 2 * target)  # slow
    assert retarget(1, 10**6)[0] == 1  # never below 1
    assert retarget(1, 0) == (2, 1000)  # at least one step


def test_reward_amounts(scenario: Scenario) -> None:
    """The miners of the committed applied updates split the miner share in proportion to their
    held-out gains; the commit signers split the rest by the stake they signed with; both rounded
    down, in address order (miners first); nothing else is minted and no amount is zero."""
    genesis = scenario.node.genesis
    _, state = scenario.genesis()
    stakes = get_validator_set(state, genesis).stakes
    signers = {key.public_key: stakes[key.public_key] for key in scenario.validators[:3]}
    miner = scenario.miner.public_key
    rewards = compute_decided_rewards(genesis, {miner: 12_345}, signers)
    assert rewards[0].address == miner and rewards[0].amount == 700_000
    assert [r.address for r in rewards[1:]] == sorted(signers) and all(r.amount == 100_000 for r in rewards[1:])
    assert sum(r.amount for r in rewards) == genesis.consensus.block_reward
    # No confirmed update: the signers are paid for their work, and not the miner.
    rejected = compute_decided_rewards(genesis, {}, signers)
    assert [r.address for r in rejected] == sorted(signers) and all(r.amount == 100_000 for r in rejected)
    # In proportion to stake, rounded down (the remainder is not minted), and no zero amounts.
    a, b, c = sorted(signers)
    assert [r.amount for r in compute_decided_rewards(genesis, {}, {a: 1, b: 2, c: 4})] == [42_857, 85_714, 171_428]
    assert [r.address for r in compute_decided_rewards(genesis, {}, {a: 1, b: 10**9})] == [b]
    assert compute_decided_rewards(genesis, {}, {}) == ()  # height 1: no certificate, and no update
    # Several miners: the 700,000 split by their held-out gains, rounded down, by address, before the signers.
    x, y, z = sorted(bytes([n]) * 32 for n in (7, 3, 5))
    split = compute_decided_rewards(genesis, {z: 1, x: 2, y: 4}, {a: 1})
    assert split == (Reward(x, 200_000), Reward(y, 400_000), Reward(z, 100_000), Reward(a, 300_000))
    assert [r.amount for r in compute_decided_rewards(genesis, {x: 1, y: 1, z: 1}, {})] == [233_333] * 3
    assert compute_decided_rewards(genesis, {x: 1, y: 10**9}, {}) == (Reward(y, 699_999),)  # no zero amounts
