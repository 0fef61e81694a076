"""The voting state machine over a simulated asynchronous network.

Safety: whatever the delays, drops, duplicates, restarts and faulty
validators holding less than 1/3 of stake do, no two honest nodes decide
different blocks at one height, and every decision carries a commit
certificate. Liveness: once messages flow again (after GST), every height
decides within a bounded number of rounds. Each run is one seed: a failure
prints its `NetworkConfig`, and running that config again replays it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chain.crypto import Domain, PrivateKey, devnet_key
from chain.votes import Commit, Proposal, Vote, VoteKind, sign_proposal, sign_vote
from consensus.voting import (
    Action,
    Broadcast,
    CheckBlock,
    Decide,
    Equivocation,
    HeightVoting,
    InvalidVote,
    ProposeValue,
    Step,
    Timeout,
    TimeoutParameters,
    ValidatorSet,
    compute_commit_time,
    compute_proposer_order,
    validate_commit,
    validate_equivocation,
    validate_proposal,
)
from tests.voting_network import (
    FAULTS,
    NetworkConfig,
    conflicting_signatures,
    is_commit_certificate,
    make_key,
    run_network,
)


@st.composite
def network_configs(draw: st.DrawFn, restarts: bool = False) -> NetworkConfig:
    """A network of 3-7 validators, faulty ones holding less than 1/3 of stake."""
    stakes = tuple(draw(st.lists(st.integers(1, 5), min_size=3, max_size=6)))
    faults = draw(st.lists(st.sampled_from(FAULTS), max_size=3))
    faulty: list[tuple[str, int]] = []
    for fault in faults:
        stake = draw(st.integers(1, 5))
        if 3 * (sum(s for _, s in faulty) + stake) < sum(stakes) + sum(s for _, s in faulty) + stake:
            faulty.append((fault, stake))
    return NetworkConfig(
        seed=draw(st.integers(0, 2**32)),
        stakes=stakes,
        faulty=tuple(faulty),
        heights=draw(st.integers(1, 3)),
        gst_ms=draw(st.sampled_from([0, 2_000, 10_000, 30_000])),
        delay_ms=draw(st.sampled_from([50, 200, 1_000])),
        drop_percent=draw(st.integers(0, 40)),
        duplicate_percent=draw(st.integers(0, 20)),
        check_ms=draw(st.sampled_from([10, 100, 800])),
        partition=draw(st.booleans()),
        slow_first_proposals_ms=draw(st.sampled_from([0, 0, 3_000])),
        restarts=draw(st.integers(1, 6)) if restarts else 0,
    )


def check_run(config: NetworkConfig) -> None:
    run = run_network(config)
    n = len(run.validators.stakes)
    for height in range(1, config.heights + 1):
        assert len(run.decided(height)) <= 1, f"two decisions at height {height}: {config}"
    for node in run.honest:
        for commit in node.decisions.values():
            assert is_commit_certificate(commit, run.validators), config
            assert commit.block_hash not in run.invalid_blocks, config
        assert conflicting_signatures(node.signed) == [], f"an honest node signed twice: {config}"
        assert len(node.decisions) == config.heights, f"not every height decided: {config}"
    bound = n + 2
    assert max(run.rounds_taken_after_gst(), default=0) <= bound, f"more than {bound} rounds after GST: {config}"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(network_configs())
def test_safety_and_liveness_over_an_asynchronous_network(config: NetworkConfig) -> None:
    check_run(config)


RESTARTED_IN_THE_LAST_HEIGHT = NetworkConfig(
    seed=1147, stakes=(3, 4, 3), faulty=(("invalid", 4),), heights=3, gst_ms=10_000, delay_ms=50,
    drop_percent=40, duplicate_percent=17, check_ms=800, partition=False, slow_first_proposals_ms=0, restarts=4,
)  # fmt: skip
"""A validator restarted after its peers' certificates reached it (and before it had checked
the block), in the last height: its peers decided and went quiet, so only their certificates,
served again after the restart as sync does, let it decide."""


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(network_configs(restarts=True))
@example(RESTARTED_IN_THE_LAST_HEIGHT)
def test_restarted_validators_never_sign_conflicting_messages(config: NetworkConfig) -> None:
    check_run(config)


# --- Named scenarios --------------------------------------------------------

TIMEOUTS = TimeoutParameters(1000, 500, 500, 250)


def equal_validators(count: int) -> tuple[list[bytes], ValidatorSet]:
    keys = [make_key(f"v{i}") for i in range(count)]
    return keys, ValidatorSet(dict.fromkeys(keys, 1), 2, 3)


def votes_of(actions: list[Action]) -> list[Vote]:
    return [a.message for a in actions if isinstance(a, Broadcast) and isinstance(a.message, Vote)]


def block(name: str) -> bytes:
    return make_key(f"block {name}")


def test_a_locked_validator_prevotes_nil_for_another_block_until_a_later_polka_unlocks_it() -> None:
    keys, validators = equal_validators(4)
    me = compute_proposer_order(validators, 1)[3]  # proposes none of rounds 0-2
    keys = [me] + [key for key in keys if key != me]
    voting = HeightVoting(1, validators, TIMEOUTS, me)
    voting.start()
    first, second = block("first"), block("second")
    voting.on_proposal(Proposal(1, 0, first, -1, voting.get_proposer(0)))
    voting.on_block_checked(first, True)
    for key in keys[1:3]:
        voting.on_vote(Vote(VoteKind.PREVOTE, 1, 0, first, 0, key))
    assert (voting.locked_value, voting.locked_round) == (first, 0)
    assert voting.step == Step.PRECOMMIT
    # Round 0 ends without a decision; round 1 proposes another valid block.
    for key in keys[1:]:
        voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 0, None, 0, key))
    voting.on_timeout(Timeout(Step.PRECOMMIT, 1, 0))
    assert voting.round == 1
    actions = voting.on_proposal(Proposal(1, 1, second, -1, voting.get_proposer(1)))
    actions += voting.on_block_checked(second, True)
    assert [v.block_hash for v in votes_of(actions)] == [None]  # locked on `first`: nil, not `second`
    # A re-proposal of `second` claiming a polka in round 0 that never happened is refused too (round 2).
    for key in keys[1:]:
        voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 1, None, 0, key))
    voting.on_timeout(Timeout(Step.PRECOMMIT, 1, 1))
    actions = voting.on_proposal(Proposal(1, 2, second, 0, voting.get_proposer(2)))
    assert votes_of(actions) == []  # waits for the claimed polka
    voting.on_timeout(Timeout(Step.PROPOSE, 1, 2))
    # A polka for `second` in round 2 moves the lock: it precommits `second`.
    actions = []
    for key in keys[1:]:
        actions += voting.on_vote(Vote(VoteKind.PREVOTE, 1, 2, second, 0, key))
    assert (voting.locked_value, voting.locked_round) == (second, 2)
    assert [(v.kind, v.block_hash) for v in votes_of(actions)] == [(VoteKind.PRECOMMIT, second)]


def test_sibling_blocks_at_one_height_decide_once() -> None:
    """The wave-1 fault: a slow proposer's block and the next proposer's block
    both exist at one height. Proposals in round 0 arrive after every node
    moved to round 1, where another block is proposed: every node decides the
    same single block."""
    for seed in range(40):
        config = NetworkConfig(seed=seed, stakes=(1, 1, 1, 1), heights=2, slow_first_proposals_ms=4_000)
        run = run_network(config)
        for height in (1, 2):
            assert len(run.decided(height)) == 1, config
        assert all(len(node.decisions) == 2 for node in run.honest), config


def test_equivocations_yield_evidence() -> None:
    keys, validators = equal_validators(4)
    voting = HeightVoting(1, validators, TIMEOUTS, keys[0])
    voting.start()
    offender = keys[1]
    first = Vote(VoteKind.PREVOTE, 1, 0, block("a"), 0, offender)
    second = Vote(VoteKind.PREVOTE, 1, 0, None, 0, offender)
    assert voting.on_vote(first) == []
    assert Equivocation(first, second) in voting.on_vote(second)
    assert not any(isinstance(a, Equivocation) for a in voting.on_vote(second))  # reported once
    proposer = voting.get_proposer(3)
    one, other = Proposal(1, 3, block("x"), -1, proposer), Proposal(1, 3, block("y"), -1, proposer)
    voting.on_proposal(one)
    assert Equivocation(one, other) in voting.on_proposal(other)
    # The same vote again, or re-signed with another timestamp, is not an equivocation.
    again = Vote(VoteKind.PRECOMMIT, 1, 0, None, 5, offender)
    voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 0, None, 0, offender))
    assert not any(isinstance(a, Equivocation) for a in voting.on_vote(again))


def test_invalid_input_is_ignored_and_changes_nothing() -> None:
    keys, validators = equal_validators(4)
    voting = HeightVoting(1, validators, TIMEOUTS, keys[0])
    voting.start()
    before = voting.signer_state(), dict(voting.prevotes), dict(voting.proposals)
    stranger = make_key("stranger")
    wrong_proposer = next(key for key in keys if key != voting.get_proposer(0))
    assert voting.on_vote(Vote(VoteKind.PREVOTE, 1, 0, block("a"), 0, stranger)) == []
    assert voting.on_vote(Vote(VoteKind.PREVOTE, 2, 0, block("a"), 0, keys[1])) == []
    assert voting.on_proposal(Proposal(1, 0, block("a"), -1, wrong_proposer)) == []
    assert voting.on_proposal(Proposal(2, 0, block("a"), -1, voting.get_proposer(0))) == []
    assert voting.on_timeout(Timeout(Step.PROPOSE, 1, 7)) == []
    assert (voting.signer_state(), dict(voting.prevotes), dict(voting.proposals)) == before


def test_skipping_ahead_needs_more_than_a_third_of_stake() -> None:
    keys, validators = equal_validators(4)
    voting = HeightVoting(1, validators, TIMEOUTS, keys[0])
    voting.start()
    voting.on_vote(Vote(VoteKind.PREVOTE, 1, 5, None, 0, keys[1]))
    assert voting.round == 0  # 1/4 of stake could all be faulty
    voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 7, None, 0, keys[2]))
    assert voting.round == 5  # 2/4 sent messages in rounds >= 5
    voting.on_vote(Vote(VoteKind.PREVOTE, 1, 10**6, None, 0, keys[3]))
    assert voting.round == 7 and 10**6 not in voting.prevotes  # beyond the window: counted, not kept


def test_a_decision_needs_a_quorum_of_precommits_in_one_round() -> None:
    keys, validators = equal_validators(4)
    voting = HeightVoting(1, validators, TIMEOUTS, keys[0])
    voting.start()
    target = block("t")
    voting.on_block_checked(target, True)
    voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 0, target, 0, keys[1]))
    voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 1, target, 0, keys[2]))
    voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 2, target, 0, keys[3]))
    assert voting.decision is None  # three precommits, but in three rounds
    actions = voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 2, target, 0, keys[1]))
    actions += voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 2, target, 0, keys[2]))
    decided = [a for a in actions if isinstance(a, Decide)]
    assert len(decided) == 1 and decided[0].commit.round == 2 and len(decided[0].commit.signatures) == 3


def test_an_invalid_block_is_never_decided_even_with_a_quorum_of_precommits() -> None:
    keys, validators = equal_validators(4)
    voting = HeightVoting(1, validators, TIMEOUTS, keys[0])
    voting.start()
    bad = block("bad")
    actions = []
    for key in keys[1:]:
        actions += voting.on_vote(Vote(VoteKind.PRECOMMIT, 1, 0, bad, 0, key))
    assert CheckBlock(bad) in actions
    assert voting.on_block_checked(bad, False) == [] and voting.decision is None


def test_the_proposer_asks_for_a_value_and_proposes_it() -> None:
    _, validators = equal_validators(4)
    proposer = HeightVoting(1, validators, TIMEOUTS).get_proposer(0)
    voting = HeightVoting(1, validators, TIMEOUTS, proposer)
    assert ProposeValue(1, 0) in voting.start()
    actions = voting.on_value(0, block("mine"))
    sent = [a.message for a in actions if isinstance(a, Broadcast)]
    assert sent[0] == Proposal(1, 0, block("mine"), -1, proposer)
    assert isinstance(sent[1], Vote) and sent[1].block_hash == block("mine")  # and prevotes for it
    assert voting.on_value(0, block("another")) == []  # one proposal per round


def test_proposer_order_is_stake_weighted_and_every_validator_proposes_once_in_n_rounds() -> None:
    keys = [make_key(f"w{i}") for i in range(4)]
    stakes = dict(zip(keys, (1, 2, 3, 10), strict=True))
    validators = ValidatorSet(stakes, 2, 3)
    first: dict[bytes, int] = dict.fromkeys(keys, 0)
    for height in range(1, 3001):
        order = compute_proposer_order(validators, height)
        assert sorted(order) == sorted(keys)
        first[order[0]] += 1
    # Round 0's proposer is drawn in proportion to stake (1:2:3:10 of 3000 heights).
    for key, stake in stakes.items():
        expected = 3000 * stake // 16
        assert abs(first[key] - expected) < 4 * (expected**0.5) + 10, (first, stake)


def test_more_than_a_third_stopped_decides_nothing_until_it_comes_back() -> None:
    """Half the stake stopped: nothing is decided (and nothing wrong); once it starts, heights decide."""
    for seed in range(5):
        config = NetworkConfig(
            seed=seed, stakes=(1, 1), faulty=(("stopped", 2),), heights=3, stopped_until_ms=60_000, delay_ms=500
        )
        run = run_network(config)
        for node in run.nodes:
            assert len(node.decisions) == 3, config
            assert min(node.decided_at.values()) >= 60_000, config
        for height in (1, 2, 3):
            assert len(run.decided(height)) == 1


# --- Signed messages, certificates and evidence -------------------------------

DOMAIN = Domain("potchain-devnet-1", bytes(32))


def signed_validators(stakes: tuple[int, ...]) -> tuple[list[PrivateKey], ValidatorSet]:
    keys = [devnet_key(f"validator-{i}") for i in range(len(stakes))]
    return keys, ValidatorSet({k.public_key: s for k, s in zip(keys, stakes, strict=True)}, 2, 3)


def precommit(key: PrivateKey, block_hash: bytes | None, timestamp: int = 100, round: int = 0) -> Vote:
    return sign_vote(key, DOMAIN, Vote(VoteKind.PRECOMMIT, 1, round, block_hash, timestamp, key.public_key))


def test_a_commit_needs_a_quorum_of_distinct_valid_signatures() -> None:
    keys, validators = signed_validators((1, 1, 1, 1))
    target = block("decided")
    commit = Commit.of([precommit(k, target) for k in keys[:3]])
    validate_commit(commit, validators, DOMAIN)
    with pytest.raises(InvalidVote, match="stake 2 of 4"):
        validate_commit(Commit.of([precommit(k, target) for k in keys[:2]]), validators, DOMAIN)
    forged = replace(commit, signatures=(*commit.signatures[:2], (commit.signatures[2][0], 100, bytes(64))))
    with pytest.raises(InvalidVote, match="signature"):
        validate_commit(forged, validators, DOMAIN)
    twice = replace(commit, signatures=(commit.signatures[0], *commit.signatures[:2]))
    with pytest.raises(InvalidVote, match="signs twice"):
        validate_commit(twice, validators, DOMAIN)
    outsider = devnet_key("outsider")
    with pytest.raises(InvalidVote, match="not a validator"):
        validate_commit(Commit.of([precommit(k, target) for k in [*keys[:3], outsider]]), validators, DOMAIN)
    # Signatures for another block, or another round, do not carry over.
    moved = replace(commit, block_hash=block("other"))
    with pytest.raises(InvalidVote, match="signature"):
        validate_commit(moved, validators, DOMAIN)


def test_commit_time_is_the_stake_weighted_median_that_a_third_of_stake_cannot_move() -> None:
    keys, validators = signed_validators((1, 1, 1, 1, 1, 1, 1))
    target = block("timed")
    honest = [precommit(k, target, 1000 + i) for i, k in enumerate(keys[:5])]
    assert compute_commit_time(Commit.of(honest), validators) == 1002
    # Two faulty validators (2/7 of stake) stamping far in the past or future stay outside the median.
    for skew in (0, 10**9):
        faulty = [precommit(k, target, skew) for k in keys[5:]]
        time = compute_commit_time(Commit.of(honest + faulty), validators)
        assert 1000 <= time <= 1004
    weighted = ValidatorSet({k.public_key: s for k, s in zip(keys[:3], (5, 1, 1), strict=True)}, 2, 3)
    votes = [precommit(k, target, t) for k, t in zip(keys[:3], (50, 10, 20), strict=True)]
    assert compute_commit_time(Commit.of(votes), weighted) == 50


def test_equivocation_evidence_is_checked() -> None:
    keys, validators = signed_validators((1, 1, 1, 1))
    offender = keys[1]
    first, second = precommit(offender, block("a")), precommit(offender, None)
    assert validate_equivocation(first, second, validators, DOMAIN) == offender.public_key
    with pytest.raises(InvalidVote, match="agree"):
        validate_equivocation(first, precommit(offender, block("a"), timestamp=7), validators, DOMAIN)
    with pytest.raises(InvalidVote, match="one round"):
        validate_equivocation(first, precommit(offender, None, round=1), validators, DOMAIN)
    with pytest.raises(InvalidVote, match="signature"):
        validate_equivocation(first, replace(second, signature=bytes(64)), validators, DOMAIN)
    with pytest.raises(InvalidVote, match="one validator"):
        validate_equivocation(first, precommit(keys[2], None), validators, DOMAIN)
    proposer = keys[0]
    one = sign_proposal(proposer, DOMAIN, Proposal(1, 0, block("x"), -1, proposer.public_key))
    other = sign_proposal(proposer, DOMAIN, Proposal(1, 0, block("y"), -1, proposer.public_key))
    assert validate_equivocation(one, other, validators, DOMAIN) == proposer.public_key
    with pytest.raises(InvalidVote, match="do not conflict"):
        validate_equivocation(one, first, validators, DOMAIN)


def test_a_proposal_must_come_from_the_rounds_proposer() -> None:
    keys, validators = signed_validators((1, 1, 1, 1))
    by_key = {k.public_key: k for k in keys}
    order = compute_proposer_order(validators, 1)
    right, wrong = by_key[order[2]], by_key[order[3]]
    validate_proposal(
        sign_proposal(right, DOMAIN, Proposal(1, 2, block("p"), -1, right.public_key)), validators, DOMAIN
    )
    with pytest.raises(InvalidVote, match="proposer"):
        validate_proposal(
            sign_proposal(wrong, DOMAIN, Proposal(1, 2, block("p"), -1, wrong.public_key)), validators, DOMAIN
        )
