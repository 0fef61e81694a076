"""Held-out tests, update commitments and copies (consensus/decisions.py): each rule of a decided
block's out-of-sample test and of commit-then-reveal, broken one at a time on a valid block and
refused with its reason.

One small devnet chain, built once for the module:

- height 1 (`first`, validator 1) names no training block; it carries the commitments of miner M
  and miner M2 to the updates they reveal on it, and of miner L to an update L reveals a height
  later (late);
- on `first` (every training block on it sets the slice it assigns): A (M's committed update), A2
  (M2's, from another local model), N (miner N's update, committed nowhere: missing), B (copier
  C's copy of A's weights under its own key) and B2 (C's copy with three weights moved by one,
  picked so that its test gain beats A's);
- height 2 (`second`, validator 0) names A, B and B2 and applies A;
- on `second`: L's late reveal; height 3 (`third`, validator 0 again) names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pytest

from chain.blocks import (
    Block,
    DecidedBody,
    RevealedSequence,
    Reward,
    TrainingBody,
    UpdateCommitment,
    compute_update_hash,
    sign_update_commitment,
)
from chain.crypto import PrivateKey, devnet_key
from chain.heldout import Shard, count_revealed, empty_bitmap, is_revealed, select_indices, with_revealed
from chain.state import State
from chain.votes import Commit
from consensus.decided_chain import DecidedChain, Decision
from consensus.decisions import (
    apply_decided_block,
    build_heldout_test,
    combine_updates,
    compute_test_input,
    get_committed_updates,
    get_validator_set,
    is_committed,
    propose_decided_block,
    rank_verdict,
)
from consensus.proposals import propose_training_block
from consensus.rules import Chain, InvalidBlock, apply_training_block, compute_next_slice
from consensus.voting import ValidatorSet
from p2p.mining import get_awaited_miners
from tests.chain_builders import Scenario, certificate, commit_to, devnet_test_shard, rebuild

COPY_SEARCH_ATTEMPTS = 20
"""Perturbations of A's weights tried for a copy whose test gain beats A's."""
SPREAD = 2000
"""How far S+ and S- move every 13th weight of A's slice from A's values (up and down): far
enough that each loses clearly more than A on any held-out sequences, not so far that it
stops gaining."""


@dataclass(frozen=True)
class Story:
    """The module's chain: three decided heights and the training blocks between them."""

    scenario: Scenario
    """The devnet node, keys and training text."""
    genesis: Block
    """Height 0."""
    genesis_state: State
    """Its state."""
    first: Block
    """Height 1 by validator 1: no training block; M's, M2's and L's commitments."""
    first_state: State
    """The state after `first`: the genesis model, no sequence revealed."""
    first_commit: Commit
    """`first`'s commit certificate."""
    first_voters: ValidatorSet
    """The validators that voted on height 1."""
    miner: PrivateKey
    """M: commits in `first`, reveals A on it."""
    second_miner: PrivateKey
    """M2: commits in `first`, reveals A2 on it."""
    uncommitted_miner: PrivateKey
    """N: reveals an update on `first` that it committed nowhere."""
    late_miner: PrivateKey
    """L: commits in `first`, reveals on `second` (a height late)."""
    copier: PrivateKey
    """C: publishes A's weights (B) and a perturbed copy (B2) on `first`."""
    committed: Block
    """A: M's committed update on `first`."""
    second_committed: Block
    """A2: M2's committed update on `first`."""
    uncommitted: Block
    """N's update on `first` (no commitment)."""
    copy: Block
    """B: A's weights under C's key on `first`."""
    perturbed_copy: Block
    """B2: A's weights with three moved by one, under C's key on `first`."""
    second: Block
    """Height 2 by validator 0: names A, B and B2."""
    second_state: State
    """The state after `second`: A applied, validator 0's test sequences revealed."""
    second_commit: Commit
    """`second`'s commit certificate."""
    second_voters: ValidatorSet
    """The validators that voted on height 2."""
    late: Block
    """L's update revealed on `second` (committed in `first`)."""


def shard_of(key: PrivateKey) -> Shard:
    """The devnet validator's held-out shard."""
    shard = devnet_test_shard(key.public_key)
    assert shard is not None
    return shard


def held_out_sequences(chain: Chain, parent: Block, state: State, proposer: PrivateKey) -> tuple[bytes, ...]:
    """The sequences `proposer`'s test on `parent` reveals."""
    test = build_heldout_test(chain, parent, state, proposer, shard_of(proposer))
    assert test is not None
    return tuple(revealed.sequence for revealed in test.sequences)


def training_body(block: Block) -> TrainingBody:
    assert isinstance(block.body, TrainingBody)
    return block.body


def decided_body(block: Block) -> DecidedBody:
    assert isinstance(block.body, DecidedBody)
    return block.body


def by_hash(blocks: list[Block]) -> dict[bytes, Block]:
    return {block.hash: block for block in blocks}


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    scenario = Scenario.create(tmp_path_factory.mktemp("heldout-rules"))
    yield build_story(scenario)
    scenario.node.close()


def build_story(scenario: Scenario) -> Story:
    """The module's chain on `scenario`'s devnet (see the module docstring)."""
    chain = scenario.chain
    slices = chain.genesis.partition.slices
    genesis, genesis_state = scenario.genesis()
    validators = scenario.validators
    miner, second_miner, uncommitted_miner, late_miner = (devnet_key(f"miner-{i}") for i in range(4))
    copier = devnet_key("copier-0")
    assigned, late_slice = compute_next_slice(1, slices), compute_next_slice(2, slices)
    assert late_slice != assigned  # L's update survives A's

    # Updates fixed before height 1 exists, trained on the genesis model (height 1 applies none):
    # M's and L's from one local model, N's from it after more steps, M2's from another.
    trainer = scenario.local_miner(genesis_state)
    genesis_weights = chain.weights(genesis_state)
    values = {miner.public_key: trainer.work(genesis_weights, assigned, b"train").values}
    late_values = trainer.values(genesis_weights, late_slice)
    values[uncommitted_miner.public_key] = trainer.work(genesis_weights, assigned, b"more").values
    other_trainer = scenario.local_miner(genesis_state)
    values[second_miner.public_key] = other_trainer.work(genesis_weights, assigned, b"second").values
    commitments = [
        commit_to(scenario, miner, 1, assigned, values[miner.public_key]),
        commit_to(scenario, second_miner, 1, assigned, values[second_miner.public_key]),
        commit_to(scenario, late_miner, 1, late_slice, late_values),
    ]
    first = propose_decided_block(
        chain, genesis, genesis_state, validators[1], [], None, None, (), shard_of(validators[1]), commitments
    )
    first_state = apply_decided_block(genesis_state, genesis, first, {}, None, chain)
    first_commit = certificate(scenario.node, first, validators[:3])
    first_voters = get_validator_set(genesis_state, chain.genesis)

    when = first.header.timestamp + 1

    def reveal(key: PrivateKey, content: np.ndarray) -> Block:
        return propose_training_block(chain, first, first_state, key, content, when, 8)

    committed = reveal(miner, values[miner.public_key])
    second_committed = reveal(second_miner, values[second_miner.public_key])
    uncommitted = reveal(uncommitted_miner, values[uncommitted_miner.public_key])
    copy = reveal(copier, values[miner.public_key])

    # B2: three of A's weights moved by one each, until its loss on the next height's test
    # sequences is below A's (a search only a copier that knew the private sequences could run).
    sequences = held_out_sequences(chain, first, first_state, validators[0])
    committed_loss = chain.loss_on(first_state.with_slice(assigned, training_body(committed).weights), sequences)
    generator = np.random.default_rng(13)
    perturbed_copy: Block | None = None
    for _ in range(COPY_SEARCH_ATTEMPTS):
        perturbed = values[miner.public_key].astype(np.int64)
        positions = generator.choice(perturbed.size, 3, replace=False)
        perturbed[positions] += generator.choice([-1, 1], 3)
        content = perturbed.astype("<i2").tobytes()
        if chain.loss_on(first_state.with_slice(assigned, content), sequences) < committed_loss:
            perturbed_copy = reveal(copier, perturbed)
            break
    assert perturbed_copy is not None, f"no perturbation of A among {COPY_SEARCH_ATTEMPTS} beats its test gain"

    named = [committed, copy, perturbed_copy]
    second = propose_decided_block(
        chain, first, first_state, validators[0], named, first_commit, first_voters, (), shard_of(validators[0])
    )
    second_state = apply_decided_block(first_state, first, second, by_hash(named), first_voters, chain)
    late = propose_training_block(chain, second, second_state, late_miner, late_values, second.header.timestamp + 1, 8)
    return Story(
        scenario, genesis, genesis_state, first, first_state, first_commit, first_voters,
        miner, second_miner, uncommitted_miner, late_miner, copier,
        committed, second_committed, uncommitted, copy, perturbed_copy,
        second, second_state, certificate(scenario.node, second, validators[:3]),
        get_validator_set(first_state, chain.genesis), late,
    )  # fmt: skip


@dataclass(frozen=True)
class Decided:
    """A decided block the tests build, with the training blocks it names and its state."""

    block: Block
    """The decided block."""
    named: dict[bytes, Block]
    """The training blocks it names, by hash."""
    state: State
    """The state after it."""


@pytest.fixture(scope="module")
def third(story: Story) -> Decided:
    """Height 3 by validator 0 on `second`: tests L's late reveal."""
    chain = story.scenario.chain
    proposer = story.scenario.validators[0]
    candidates = [story.late]
    block = propose_decided_block(
        chain, story.second, story.second_state, proposer, candidates, story.second_commit, story.second_voters,
        (), shard_of(proposer),
    )  # fmt: skip
    named = by_hash(candidates)
    state = apply_decided_block(story.second_state, story.second, block, named, story.second_voters, chain)
    return Decided(block, named, state)


def resigned(story: Story, block: Block, body: DecidedBody, **header: object) -> Block:
    """`block` with `body` (and header fields) changed, signed again by its proposer."""
    signer = next(k for k in story.scenario.validators if k.public_key == block.header.proposer)
    return rebuild(Block(block.header, body, block.signature), signer, story.scenario.chain.domain, **header)


def decide_second(story: Story, named: list[Block], commitments: tuple[UpdateCommitment, ...] = ()) -> Block:
    """A height-2 block by validator 0 (the one whose test `second` carries) naming `named`."""
    proposer = story.scenario.validators[0]
    return propose_decided_block(
        story.scenario.chain, story.first, story.first_state, proposer, named, story.first_commit,
        story.first_voters, (), shard_of(proposer), commitments,
    )  # fmt: skip


def apply_second(story: Story, block: Block, named: Mapping[bytes, Block], state: State | None = None) -> State:
    """Check `block` as height 2 (on `state`, by default the state after `first`)."""
    return apply_decided_block(
        story.first_state if state is None else state, story.first, block, named, story.first_voters,
        story.scenario.chain,
    )  # fmt: skip


def variant_tested_on(story: Story, state: State) -> tuple[Block, dict[bytes, Block]]:
    """A height-2 block by validator 0 testing A, for a variant `state` of the state after `first`
    (other held-out records): A is signed again for that state's root, so that the test is checked."""
    valid = decide_second(story, [story.committed])
    body = decided_body(valid)
    moved = rebuild(story.committed, story.miner, story.scenario.chain.domain, state_root=state.root)
    verdict = dataclasses.replace(body.training[0], training_block=moved.hash)
    return resigned(story, valid, dataclasses.replace(body, training=(verdict,), applied=(moved.hash,))), {
        moved.hash: moved
    }


def second_named(story: Story) -> dict[bytes, Block]:
    return by_hash([story.committed, story.copy, story.perturbed_copy])


def with_test(
    body: DecidedBody, sequences: tuple[RevealedSequence, ...] | None = None, vrf_proof: bytes | None = None
) -> DecidedBody:
    """`body` with its test's sequences or ECVRF proof replaced."""
    assert body.test is not None
    test = body.test
    if sequences is not None:
        test = dataclasses.replace(test, sequences=sequences)
    if vrf_proof is not None:
        test = dataclasses.replace(test, vrf_proof=vrf_proof)
    return dataclasses.replace(body, test=test)


def with_sequence(body: DecidedBody, position: int, revealed: RevealedSequence) -> DecidedBody:
    """`body` with its test's sequence at `position` replaced."""
    assert body.test is not None
    sequences = list(body.test.sequences)
    sequences[position] = revealed
    return with_test(body, tuple(sequences))


def miner_share(story: Story) -> int:
    consensus = story.scenario.chain.genesis.consensus
    return consensus.block_reward * consensus.miner_share_percent // 100


def paid(block: Block) -> set[bytes]:
    return {reward.address for reward in decided_body(block).rewards}


def applied_reason(got: list[Block], want: list[Block]) -> str:
    """The reason a block claiming to apply `got` instead of `want` is refused (a pattern)."""

    def listed(blocks: list[Block]) -> str:
        return r"\[" + ", ".join(block.hash.hex()[:16] for block in blocks) + r"\]" if blocks else "none"

    return f"applied: got {listed(got)}, want {listed(want)}"


# --- The valid chain ---------------------------------------------------------------------


def test_the_valid_chain(story: Story, third: Decided) -> None:
    """Every block the tests break is valid as built: height 2 applies A (the only committed update
    it names), pays M the whole miner share and marks validator 0's revealed sequences; the
    commitments land where they were carried."""
    chain = story.scenario.chain
    body = decided_body(story.second)
    assert apply_second(story, story.second, second_named(story)).root == story.second_state.root
    assert body.applied == (story.committed.hash,)
    assert body.test is not None and body.test.loss_after == body.test.loss_before - body.gains()[story.committed.hash]
    assert body.rewards[0] == Reward(story.miner.public_key, miner_share(story))
    assert story.second_state.slices != story.first_state.slices
    assert is_committed(story.first, story.committed) and is_committed(story.first, story.second_committed)
    for block in (story.committed, story.second_committed, story.uncommitted, story.copy, story.perturbed_copy):
        assert apply_training_block(story.first_state, story.first, block, chain) is story.first_state
    assert apply_training_block(story.second_state, story.second, story.late, chain) is story.second_state
    third_body = decided_body(third.block)
    assert third_body.test is not None and third.state.finalized_height == 3


# --- 1, 2: revealed sequences and their Merkle proofs ---------------------------------------


@pytest.mark.parametrize("change", ["flipped_byte", "one_sibling_short", "one_sibling_more", "half_a_sibling"])
def test_a_revealed_sequence_with_a_bad_merkle_proof_is_refused(story: Story, change: str) -> None:
    body = decided_body(story.second)
    assert body.test is not None
    position = 5
    revealed = body.test.sequences[position]
    proof = revealed.proof
    if change == "flipped_byte":
        proof = proof[:40] + bytes([proof[40] ^ 1]) + proof[41:]
    elif change == "one_sibling_short":
        proof = proof[:-32]
    elif change == "one_sibling_more":
        proof = proof + bytes(32)
    elif change == "half_a_sibling":
        proof = proof[:-16]
    forged = resigned(story, story.second, with_sequence(body, position, dataclasses.replace(revealed, proof=proof)))
    reason = f"sequence {revealed.index}: its Merkle proof does not match the commitment"
    with pytest.raises(InvalidBlock, match=reason):
        apply_second(story, forged, second_named(story))
    apply_second(story, story.second, second_named(story))


@pytest.mark.parametrize("change", ["flipped_byte", "another_sequence", "short"])
def test_a_revealed_sequence_whose_bytes_changed_is_refused(story: Story, change: str) -> None:
    """A changed byte, or another sequence of the same shard (a true leaf, at another index), no
    longer matches the proof; a sequence of the wrong length is refused before its proof."""
    body = decided_body(story.second)
    assert body.test is not None
    position = 3
    revealed = body.test.sequences[position]
    sequence = revealed.sequence
    reason = f"sequence {revealed.index}: its Merkle proof does not match the commitment"
    if change == "flipped_byte":
        sequence = sequence[:7] + bytes([sequence[7] ^ 0x20]) + sequence[8:]
    elif change == "another_sequence":
        sequence = body.test.sequences[position + 1].sequence
    elif change == "short":
        sequence = sequence[:-1]
        reason = f"sequence {revealed.index} has {len(sequence)} bytes, want {len(revealed.sequence)}"
    assert sequence != revealed.sequence
    forged = resigned(
        story, story.second, with_sequence(body, position, dataclasses.replace(revealed, sequence=sequence))
    )
    with pytest.raises(InvalidBlock, match=reason):
        apply_second(story, forged, second_named(story))
    apply_second(story, story.second, second_named(story))


# --- 3: a revealed sequence never judges again ----------------------------------------------


def test_a_revealed_sequence_is_never_revealed_again(story: Story, third: Decided) -> None:
    """After height 2 revealed validator 0's sequences, the state marks them; height 3 by the same
    validator reveals others; a height-3 block that reveals one of them again is refused, and so
    is height 2 itself checked against a state that already marks its sequences."""
    proposer = story.scenario.validators[0].public_key
    second_test = decided_body(story.second).test
    third_test = decided_body(third.block).test
    assert second_test is not None and third_test is not None
    revealed = [sequence.index for sequence in second_test.sequences]
    bitmap = story.second_state.heldout[proposer].revealed
    assert count_revealed(story.first_state.heldout[proposer].revealed) == 0
    assert count_revealed(bitmap) == len(revealed) == story.scenario.chain.genesis.evaluation.test_sequences
    assert all(is_revealed(bitmap, index) for index in revealed)
    assert (
        story.second_state.heldout[story.scenario.validators[1].public_key]
        == story.first_state.heldout[story.scenario.validators[1].public_key]
    )
    third_indices = [sequence.index for sequence in third_test.sequences]
    assert not set(third_indices) & set(revealed)
    assert count_revealed(third.state.heldout[proposer].revealed) == 2 * len(revealed)

    # Height 3 reveals one of height 2's sequences again (its bytes and proof are true).
    reused = resigned(story, third.block, with_sequence(decided_body(third.block), 0, second_test.sequences[0]))
    with pytest.raises(InvalidBlock, match=r"test: sequences \[" + str(revealed[0]) + r", .*picked by the vrf output"):
        apply_decided_block(
            story.second_state, story.second, reused, third.named, story.second_voters, story.scenario.chain
        )
    # Height 2's test again, on a state where its sequences were already revealed.
    record = story.first_state.heldout[proposer]
    marked = dict(story.first_state.heldout)
    marked[proposer] = dataclasses.replace(record, revealed=with_revealed(record.revealed, revealed))
    block, named = variant_tested_on(story, dataclasses.replace(story.first_state, heldout=marked))
    with pytest.raises(InvalidBlock, match="picked by the vrf output"):
        apply_second(story, block, named, dataclasses.replace(story.first_state, heldout=marked))


def test_select_indices_never_picks_a_revealed_sequence(story: Story) -> None:
    """Over many seeds and bitmaps (height 2's, random ones, a nearly spent one): the picked
    indices are distinct, unrevealed and as many as wanted; a shard with fewer left gives None."""
    record = story.second_state.heldout[story.scenario.validators[0].public_key]
    count, wanted = record.sequences, story.scenario.chain.genesis.evaluation.test_sequences
    generator = np.random.default_rng(17)
    bitmaps = [record.revealed]
    for density in (0.1, 0.5, 0.9):
        bitmaps.append(with_revealed(empty_bitmap(count), np.flatnonzero(generator.random(count) < density).tolist()))
    left = generator.choice(count, wanted, replace=False).tolist()
    bitmaps.append(with_revealed(empty_bitmap(count), sorted(set(range(count)) - set(left))))
    for bitmap in bitmaps:
        for seed in range(100):
            picked = select_indices(seed.to_bytes(32, "big"), bitmap, count, wanted)
            assert picked is not None and len(set(picked)) == wanted
            assert not any(is_revealed(bitmap, index) for index in picked)
    assert set(select_indices(bytes(32), bitmaps[-1], count, wanted) or ()) == set(left)
    spent = with_revealed(bitmaps[-1], left[:1])
    assert select_indices(bytes(32), spent, count, wanted) is None


# --- 4: the sequences are the ones the proposer's randomness picks ---------------------------


@pytest.mark.parametrize(
    "change, reason",
    [
        ("swapped", "picked by the vrf output"),
        ("replaced", "picked by the vrf output"),
        ("another_validator", "vrf_proof is not the proposer's proof for this parent"),
        ("another_parent", "vrf_proof is not the proposer's proof for this parent"),
    ],
)
def test_a_test_the_randomness_did_not_pick_is_refused(story: Story, change: str, reason: str) -> None:
    """Sequences in another order, one true sequence of the shard in place of a picked one, another
    validator's proof, or the proposer's own proof for another parent: each refused."""
    body = decided_body(story.second)
    assert body.test is not None
    sequences = body.test.sequences
    validators = story.scenario.validators
    if change == "swapped":
        forged = with_test(body, (sequences[1], sequences[0], *sequences[2:]))
    elif change == "replaced":
        shard = shard_of(validators[0])
        picked = {sequence.index for sequence in sequences}
        other = next(index for index in range(shard.count) if index not in picked)
        true_one = RevealedSequence(other, shard.sequences[other], b"".join(shard.proof(other)))
        forged = with_sequence(body, 4, true_one)
    elif change == "another_validator":
        forged = with_test(body, vrf_proof=validators[1].prove_vrf(compute_test_input(story.first.hash)))
    else:
        forged = with_test(body, vrf_proof=validators[0].prove_vrf(compute_test_input(story.genesis.hash)))
    with pytest.raises(InvalidBlock, match=reason):
        apply_second(story, resigned(story, story.second, forged), second_named(story))
    apply_second(story, story.second, second_named(story))


def test_a_proposer_without_a_shard_tests_nothing(story: Story) -> None:
    """A proposer with no committed shard (its entry gone from the state), or a spent one, names no
    training block: the builder names none, and a block that tests anyway is refused."""
    chain = story.scenario.chain
    proposer = story.scenario.validators[0]
    record = story.first_state.heldout[proposer.public_key]
    without = dict(story.first_state.heldout)
    del without[proposer.public_key]
    no_shard = dataclasses.replace(story.first_state, heldout=without)
    spent = dict(story.first_state.heldout)
    spent[proposer.public_key] = dataclasses.replace(
        record, revealed=with_revealed(record.revealed, range(record.sequences - 31))
    )  # 31 left, a test reveals 32
    spent_shard = dataclasses.replace(story.first_state, heldout=spent)
    block, named = variant_tested_on(story, no_shard)
    with pytest.raises(InvalidBlock, match="the proposer committed no held-out shard"):
        apply_second(story, block, named, no_shard)
    block, named = variant_tested_on(story, spent_shard)
    with pytest.raises(InvalidBlock, match="the proposer's shard has fewer than 32 unrevealed sequences"):
        apply_second(story, block, named, spent_shard)
    for state in (no_shard, spent_shard):
        assert build_heldout_test(chain, story.first, state, proposer, shard_of(proposer)) is None
        block = propose_decided_block(
            chain, story.first, state, proposer, [story.committed], story.first_commit, story.first_voters, (),
            shard_of(proposer),
        )  # fmt: skip
        body = decided_body(block)
        assert body.training == () and body.test is None and body.applied == ()
    # Without its shard file at hand, a validator with one names none either.
    block = propose_decided_block(
        chain, story.first, story.first_state, proposer, [story.committed], story.first_commit, story.first_voters,
        (), None,
    )  # fmt: skip
    assert decided_body(block).training == ()


# --- 5: commitments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, reason",
    [
        ("another_height", "commitments: [0-9a-f]{16}'s is for height 2, want 1"),
        ("another_key", "commitments: [0-9a-f]{16}'s signature is not its miner's"),
        ("twice", "commitments: [0-9a-f]{16} commits twice"),
    ],
)
def test_each_commitment_rule(story: Story, change: str, reason: str) -> None:
    """Height 1 carries M's commitment: one for height 2, one in M's name signed by another key, or
    a second one by M (to another update) is refused."""
    chain = story.scenario.chain
    body = decided_body(story.first)
    ours = next(c for c in body.commitments if c.miner == story.miner.public_key)
    commitments = list(body.commitments)
    position = commitments.index(ours)
    if change == "another_height":
        commitments[position] = sign_update_commitment(story.miner, chain.domain, 2, ours.update_hash)
    elif change == "another_key":
        signed = sign_update_commitment(story.copier, chain.domain, 1, ours.update_hash)
        commitments[position] = dataclasses.replace(ours, signature=signed.signature)
    else:
        commitments.append(sign_update_commitment(story.miner, chain.domain, 1, bytes(32)))
    forged = resigned(story, story.first, dataclasses.replace(body, commitments=tuple(commitments)))
    with pytest.raises(InvalidBlock, match=reason):
        apply_decided_block(story.genesis_state, story.genesis, forged, {}, None, chain)
    apply_decided_block(story.genesis_state, story.genesis, story.first, {}, None, chain)


def test_an_update_nobody_committed_to_is_applied_only_if_no_committed_one_gains(story: Story) -> None:
    """N's update (no commitment in its parent) is a valid training block. Named alone it is applied
    (it gains) and nobody is paid as its miner; named with A, committed, A is applied and M paid,
    although N's test gain is larger (found: 168,892,230 against 111,086,283)."""
    chain = story.scenario.chain
    uncommitted_miner = story.uncommitted_miner.public_key
    assert uncommitted_miner not in get_committed_updates(story.first)
    assert not is_committed(story.first, story.uncommitted)

    alone = decide_second(story, [story.uncommitted])
    body = decided_body(alone)
    state = apply_second(story, alone, by_hash([story.uncommitted]))
    assert body.applied == (story.uncommitted.hash,) and (body.gain_of(story.uncommitted.hash) or 0) > 0
    assert (
        body.test is not None and body.test.loss_after == body.test.loss_before - body.gains()[story.uncommitted.hash]
    )
    slice_id = training_body(story.uncommitted).slice_id
    assert state.slices[slice_id] == training_body(story.uncommitted).weights
    assert uncommitted_miner not in paid(alone)
    assert paid(alone) == {key.public_key for key in story.scenario.validators[:3]}  # the signers only
    paying = resigned(
        story, alone, dataclasses.replace(body, rewards=(Reward(uncommitted_miner, miner_share(story)), *body.rewards))
    )
    with pytest.raises(InvalidBlock, match="rewards: got"):
        apply_second(story, paying, by_hash([story.uncommitted]))

    both = decide_second(story, [story.uncommitted, story.committed])
    body = decided_body(both)
    named = by_hash([story.uncommitted, story.committed])
    apply_second(story, both, named)
    gains = body.gains()
    assert gains[story.uncommitted.hash] > gains[story.committed.hash] > 0
    assert body.applied == (story.committed.hash,)
    assert body.rewards[0] == Reward(story.miner.public_key, miner_share(story))
    assert uncommitted_miner not in paid(both)
    forged = dataclasses.replace(body, applied=(story.uncommitted.hash,), rewards=decided_body(alone).rewards)
    with pytest.raises(InvalidBlock, match=applied_reason([story.uncommitted], [story.committed])):
        apply_second(story, resigned(story, both, forged), named)
    assert chain.genesis.consensus.miner_share_percent > 0


def test_an_update_committed_a_height_early_is_uncommitted(story: Story, third: Decided) -> None:
    """L committed in height 1 to the update it revealed on height 2: its commitment is in an
    earlier block than its parent, so the update counts as uncommitted. Named at height 3 it is
    applied (it gains) and nobody is paid as a miner; a block paying L is refused."""
    chain = story.scenario.chain
    late_miner = story.late_miner.public_key
    update = training_body(story.late)
    assert get_committed_updates(story.first)[late_miner] == compute_update_hash(
        late_miner, update.slice_id, update.weights
    )
    assert late_miner not in get_committed_updates(story.second)
    assert not is_committed(story.second, story.late)
    body = decided_body(third.block)
    assert body.gains()[story.late.hash] > 0 and body.applied == (story.late.hash,)
    assert third.state.slices[update.slice_id] == update.weights
    assert paid(third.block) == {key.public_key for key in story.scenario.validators[:3]}  # the signers only
    paying = dataclasses.replace(body, rewards=(Reward(late_miner, miner_share(story)), *body.rewards))
    with pytest.raises(InvalidBlock, match="rewards: got"):
        apply_decided_block(
            story.second_state, story.second, resigned(story, third.block, paying), third.named, story.second_voters,
            chain,
        )  # fmt: skip


# --- 6: copies -------------------------------------------------------------------------------


def test_a_copy_ranks_below_the_committed_original(story: Story) -> None:
    """C publishes A's weights under its key on height 1 (B) and a perturbed
    copy (B2, three weights moved by one); both are valid training blocks, neither committed. B's
    test gain equals A's, B2's is larger (found: by 70 of 111,086,283); height 2 applies A, pays M
    and nothing to C."""
    chain = story.scenario.chain
    committed, copy, perturbed = (training_body(b) for b in (story.committed, story.copy, story.perturbed_copy))
    assert copy.slice_id == perturbed.slice_id == committed.slice_id and copy.weights == committed.weights
    assert perturbed.weights != committed.weights
    moved = np.frombuffer(perturbed.weights, "<i2").astype(int) - np.frombuffer(committed.weights, "<i2")
    assert np.count_nonzero(moved) == 3 and np.abs(moved).max() == 1
    for block in (story.copy, story.perturbed_copy):
        assert not is_committed(story.first, block)
        assert apply_training_block(story.first_state, story.first, block, chain) is story.first_state
    body = decided_body(story.second)
    gains = body.gains()
    assert gains[story.copy.hash] == gains[story.committed.hash] > 0
    assert gains[story.perturbed_copy.hash] > gains[story.committed.hash]
    assert body.applied == (story.committed.hash,)
    assert body.rewards[0] == Reward(story.miner.public_key, miner_share(story))
    assert story.copier.public_key not in paid(story.second)
    assert rank_verdict(True, gains[story.committed.hash], story.committed.hash) < rank_verdict(
        False, gains[story.perturbed_copy.hash], story.perturbed_copy.hash
    )


@pytest.mark.parametrize("applied, pays_copier", [("copy", False), ("perturbed_copy", False), ("perturbed_copy", True)])
def test_a_proposer_cannot_apply_a_copy(story: Story, applied: str, pays_copier: bool) -> None:
    """Height 2 forged to apply B or B2 (with the rewards of an uncommitted update, or paying C) is refused."""
    block: Block = getattr(story, applied)
    body = decided_body(story.second)
    signers = tuple(r for r in body.rewards if r.address != story.miner.public_key)
    rewards = ((Reward(story.copier.public_key, miner_share(story)),) if pays_copier else ()) + signers
    forged = resigned(story, story.second, dataclasses.replace(body, applied=(block.hash,), rewards=rewards))
    with pytest.raises(InvalidBlock, match=applied_reason([block], [story.committed])):
        apply_second(story, forged, second_named(story))
    paying_copier = dataclasses.replace(body, rewards=(Reward(story.copier.public_key, miner_share(story)), *signers))
    with pytest.raises(InvalidBlock, match="rewards: got"):
        apply_second(story, resigned(story, story.second, paying_copier), second_named(story))


def test_a_copy_cannot_be_carried_to_the_next_height(story: Story) -> None:
    """A copier sees A only when it is revealed on height 1, so its commitment to a copy can be
    carried by height 2 at the earliest (one for height 1 there is refused), and revealed on it; but
    height 2 assigns the next slice, so A's weights (or B2's) on A's slice on `second` are refused:
    an update counts only at the height it was trained for."""
    chain = story.scenario.chain
    body = decided_body(story.second)
    copier_commitment = sign_update_commitment(story.copier, chain.domain, 1, bytes(32))
    early = dataclasses.replace(body, commitments=(*body.commitments, copier_commitment))
    with pytest.raises(InvalidBlock, match="is for height 1, want 2"):
        apply_second(story, resigned(story, story.second, early), second_named(story))

    committed = training_body(story.committed)
    assigned = compute_next_slice(story.second.header.height, chain.genesis.partition.slices)
    assert assigned != committed.slice_id
    for original in (story.committed, story.perturbed_copy):
        weights = training_body(original).weights
        copy = rebuild(story.late, story.copier, chain.domain, proposer=story.copier.public_key,
                       slice_id=committed.slice_id, weights=weights)  # fmt: skip
        with pytest.raises(InvalidBlock, match=f"slice_id: got {committed.slice_id}, want {assigned}"):
            apply_training_block(story.second_state, story.second, copy, chain)


# --- 7: combining committed updates (docs/spec.md, section 18) ------------------------------


@dataclass(frozen=True)
class Crowd:
    """Height 1 again by validator 1 (`first` with more commitments), and on it A and A2 again,
    S+ and S- (A's weights plus and minus SPREAD at every 13th weight: each alone gains less than
    A, their mean is A), D (a tenth of A's move from the genesis values) and N again: S+, S- and
    D by three more miners, every update but N's committed in this height 1 (all of them set the
    slice height 1 assigns)."""

    first: Block
    """The other height 1."""
    state: State
    """The state after it."""
    commit: Commit
    """Its commit certificate."""
    committed: Block
    """A (M's weights) on it."""
    second_committed: Block
    """A2 (M2's weights) on it."""
    spread: tuple[Block, Block]
    """S+ and S-."""
    diluted: Block
    """D."""
    uncommitted: Block
    """N's weights on it, committed nowhere."""


@pytest.fixture(scope="module")
def crowd(story: Story) -> Crowd:
    """Built apart from `first`: any change to `first` changes every draw after it (the held-out
    sequences, the validation batches) that the story's other facts were found on."""
    scenario, chain = story.scenario, story.scenario.chain
    a, a2 = training_body(story.committed), training_body(story.second_committed)
    ours = np.frombuffer(a.weights, dtype="<i2").astype(np.int64)
    genesis_values = np.frombuffer(story.genesis_state.slices[a.slice_id], dtype="<i2").astype(np.int64)
    move = np.zeros_like(ours)
    move[::13] = SPREAD
    spread_values = [ours + move, ours - move]
    assert all(np.abs(values).max() < 2**15 for values in spread_values)
    updates = [
        (story.miner, ours),
        (story.second_miner, np.frombuffer(a2.weights, dtype="<i2")),
        (devnet_key("spread-up"), spread_values[0]),
        (devnet_key("spread-down"), spread_values[1]),
        (devnet_key("diluter"), genesis_values + (ours - genesis_values) // 10),
    ]
    commitments = [commit_to(scenario, key, 1, a.slice_id, values) for key, values in updates]
    proposer = scenario.validators[1]
    first = propose_decided_block(
        chain, story.genesis, story.genesis_state, proposer, [], None, None, (), shard_of(proposer), commitments
    )
    state = apply_decided_block(story.genesis_state, story.genesis, first, {}, None, chain)
    when = first.header.timestamp + 1
    blocks = [propose_training_block(chain, first, state, key, values, when, 8) for key, values in updates]
    for block in blocks:
        assert is_committed(first, block) and apply_training_block(state, first, block, chain) is state
    n_values = np.frombuffer(training_body(story.uncommitted).weights, dtype="<i2")
    uncommitted = propose_training_block(chain, first, state, story.uncommitted_miner, n_values, when, 8)
    assert not is_committed(first, uncommitted) and apply_training_block(state, first, uncommitted, chain) is state
    commit = certificate(scenario.node, first, scenario.validators[:3])
    return Crowd(first, state, commit, blocks[0], blocks[1], (blocks[2], blocks[3]), blocks[4], uncommitted)


def apply_on_crowd(story: Story, crowd: Crowd, block: Block, named: Mapping[bytes, Block]) -> State:
    """Check `block` as height 2 on the crowd's height 1."""
    chain = story.scenario.chain
    return apply_decided_block(crowd.state, crowd.first, block, named, story.first_voters, chain)


def decide_on_crowd(story: Story, crowd: Crowd, named: list[Block]) -> Decided:
    """A height-2 block by validator 0 on the crowd's height 1 naming `named`, checked."""
    chain, proposer = story.scenario.chain, story.scenario.validators[0]
    block = propose_decided_block(
        chain, crowd.first, crowd.state, proposer, named, crowd.commit, story.first_voters, (), shard_of(proposer)
    )
    return Decided(block, by_hash(named), apply_on_crowd(story, crowd, block, by_hash(named)))


@pytest.fixture(scope="module")
def averaged(story: Story, crowd: Crowd) -> Decided:
    """Height 2 by validator 0 on the crowd's height 1 naming N, S- and S+ (in that order)."""
    return decide_on_crowd(story, crowd, [crowd.uncommitted, crowd.spread[1], crowd.spread[0]])


def loss_with(story: Story, crowd: Crowd, body: DecidedBody, updates: list[Block]) -> int:
    """The loss total, on `body`'s held-out sequences, of the crowd's state with `updates` combined."""
    assert body.test is not None
    sequences = tuple(revealed.sequence for revealed in body.test.sequences)
    return story.scenario.chain.loss_on(combine_updates(crowd.state, [training_body(b) for b in updates]), sequences)


def ranked(body: DecidedBody, blocks: list[Block]) -> list[Block]:
    """Committed `blocks` in the order the rules rank them: the larger test gain, then the smaller hash."""
    gains = body.gains()
    return sorted(blocks, key=lambda block: (-gains[block.hash], block.hash))


def test_committed_updates_of_the_slice_are_averaged(story: Story, crowd: Crowd, averaged: Decided) -> None:
    """S+ and S- (committed) each gain less than A; their mean is A's values exactly, so height 2
    naming both applies both, best-ranked first, whatever order it names them in: the slice holds
    the mean (A's weights) and the test's loss_after is A's loss. N (uncommitted) is left out
    however much it gains: an uncommitted update is never combined."""
    body, state = decided_body(averaged.block), averaged.state
    assert body.test is not None
    gains = body.gains()
    slice_id = training_body(crowd.committed).slice_id
    assert all(training_body(b).slice_id == slice_id for b in crowd.spread)
    a_loss = loss_with(story, crowd, body, [crowd.committed])
    assert min(gains[b.hash] for b in crowd.spread) > 0
    assert body.test.loss_before - max(gains[b.hash] for b in crowd.spread) > a_loss
    assert body.applied == tuple(b.hash for b in ranked(body, list(crowd.spread)))
    assert state.slices[slice_id] == training_body(crowd.committed).weights
    assert state.slices == combine_updates(crowd.state, [training_body(b) for b in crowd.spread]).slices
    assert body.test.loss_after == a_loss
    assert crowd.uncommitted.hash not in body.applied and gains[crowd.uncommitted.hash] > 0


def test_the_applied_committed_miners_split_the_miner_share_by_their_gains(
    story: Story, crowd: Crowd, averaged: Decided
) -> None:
    """The miners of S+ and S- are paid the miner share in proportion to their updates' own test
    gains (rounded down, by address), then the signers; N's miner nothing. The old payout (the
    whole share to the best miner) is refused."""
    body = decided_body(averaged.block)
    gains = body.gains()
    share = miner_share(story)
    applied = [averaged.named[h] for h in body.applied]
    total = sum(gains[b.hash] for b in applied)
    want = sorted(
        [Reward(b.header.proposer, share * gains[b.hash] // total) for b in applied], key=lambda reward: reward.address
    )
    assert body.rewards[:2] == tuple(want)
    assert all(reward.amount > 0 for reward in want) and share - len(want) < sum(r.amount for r in want) <= share
    assert {r.address for r in body.rewards[2:]} == {key.public_key for key in story.scenario.validators[:3]}
    assert story.uncommitted_miner.public_key not in paid(averaged.block)
    old = (Reward(applied[0].header.proposer, share), *body.rewards[2:])
    with pytest.raises(InvalidBlock, match="rewards: got"):
        forged = resigned(story, averaged.block, dataclasses.replace(body, rewards=old))
        apply_on_crowd(story, crowd, forged, averaged.named)


@pytest.mark.parametrize("change", ["loss_after", "missing", "extra", "order"])
def test_a_block_that_misstates_what_it_applies_is_refused(
    story: Story, crowd: Crowd, averaged: Decided, change: str
) -> None:
    """The averaging block with its test's loss_after claiming the best single update's loss, or its
    applied list missing S-, naming N too, or in the other order: each refused, naming the field."""
    body = decided_body(averaged.block)
    assert body.test is not None
    first, second = ranked(body, list(crowd.spread))
    if change == "loss_after":
        single = body.test.loss_before - body.gains()[first.hash]
        forged = dataclasses.replace(body, test=dataclasses.replace(body.test, loss_after=single))
        reason = f"test: loss_after {single}, want {body.test.loss_after}"
    else:
        claimed = {"missing": [first], "extra": [first, second, crowd.uncommitted], "order": [second, first]}[change]
        forged = dataclasses.replace(body, applied=tuple(block.hash for block in claimed))
        reason = applied_reason(claimed, [first, second])
    with pytest.raises(InvalidBlock, match=reason):
        apply_on_crowd(story, crowd, resigned(story, averaged.block, forged), averaged.named)


def test_of_equal_combinations_the_fewest_updates_are_applied(story: Story, crowd: Crowd) -> None:
    """A, S+ and S- named together: A ranks first; A with S+ loses more than A alone; all three
    average to A's values exactly, a tie with A alone, so A alone is applied and M paid the share."""
    named = [*crowd.spread, crowd.committed]
    decided = decide_on_crowd(story, crowd, named)
    body, state = decided_body(decided.block), decided.state
    assert body.test is not None
    a = training_body(crowd.committed)
    assert ranked(body, named)[0] == crowd.committed
    assert loss_with(story, crowd, body, [crowd.committed, crowd.spread[0]]) > loss_with(
        story, crowd, body, [crowd.committed]
    )
    assert (
        combine_updates(crowd.state, [training_body(b) for b in named]).slices
        == crowd.state.with_slice(a.slice_id, a.weights).slices
    )
    assert body.applied == (crowd.committed.hash,)
    assert state.slices[a.slice_id] == a.weights
    assert body.test.loss_after == body.test.loss_before - body.gains()[crowd.committed.hash]
    assert body.rewards[0] == Reward(story.miner.public_key, miner_share(story))
    assert not {r.address for r in body.rewards} & {b.header.proposer for b in crowd.spread}


def test_a_committed_update_that_makes_the_combination_worse_is_left_out(story: Story, crowd: Crowd) -> None:
    """A, A2 and D (committed, a tenth of A's move on A's slice): D gains least, so it ranks last;
    A, A2 and D combined average A's slice about halfway back to the genesis values and lose
    more than A and A2 combined, so height 2 applies A and A2 only, and D's miner is not paid."""
    named = [crowd.diluted, crowd.committed, crowd.second_committed]
    decided = decide_on_crowd(story, crowd, named)
    body, state = decided_body(decided.block), decided.state
    assert body.test is not None
    gains = body.gains()
    order = ranked(body, named)
    assert order[-1] == crowd.diluted and gains[crowd.diluted.hash] > 0
    assert body.applied == tuple(b.hash for b in order[:2])
    assert loss_with(story, crowd, body, named) > body.test.loss_after == loss_with(story, crowd, body, order[:2])
    assert state.slices == combine_updates(crowd.state, [training_body(b) for b in order[:2]]).slices
    assert crowd.diluted.header.proposer not in {r.address for r in body.rewards}


def test_combine_updates_rounds_a_shared_slice_half_up(story: Story) -> None:
    """`combine_updates` in integers: a slice two updates set holds their mean rounded half up
    (1 and 2 -> 2, -1 and -2 -> -1, 7 and 8 -> 8, the int16 extremes stay in range), three
    updates' mean rounds to the nearest (1, 1, 2 -> 1; 0, 1, 1 -> 1), and updates of other
    slices apply side by side, the rest untouched (none on the chain: every update of a height
    sets one slice)."""
    state = story.first_state
    a = training_body(story.committed)
    other = (a.slice_id + 1) % len(state.slices)
    a2 = dataclasses.replace(a, slice_id=other, weights=state.slices[other])

    def update(values: list[int], base: TrainingBody = a) -> TrainingBody:
        content = np.frombuffer(base.weights, dtype="<i2").copy()
        content[: len(values)] = values
        return dataclasses.replace(base, weights=content.astype("<i2").tobytes())

    def head(combined: State, count: int, slice_id: int = a.slice_id) -> list[int]:
        return [int(value) for value in np.frombuffer(combined.slices[slice_id], dtype="<i2")[:count]]

    pair = combine_updates(state, [update([1, -1, 7, 32767, -32768, 0]), update([2, -2, 8, 32767, -32767, 0])])
    assert head(pair, 6) == [2, -1, 8, 32767, -32767, 0]
    assert pair.slices[a.slice_id][12:] == a.weights[12:]
    three = combine_updates(state, [update([1, 0, -1, -4]), update([1, 1, -1, -5]), update([2, 1, -2, -5])])
    assert head(three, 4) == [1, 1, -1, -5]
    side_by_side = combine_updates(state, [update([5]), update([-3], a2)])
    assert head(side_by_side, 1) == [5] and head(side_by_side, 1, a2.slice_id) == [-3]
    untouched = [i for i in range(len(state.slices)) if i not in (a.slice_id, a2.slice_id)]
    assert all(side_by_side.slices[i] == state.slices[i] for i in untouched)
    assert combine_updates(state, []) is state


def test_an_honest_proposer_tests_the_committed_candidates_or_else_the_best_uncommitted_one(story: Story) -> None:
    """`DecidedChain.get_training_candidates` (docs/spec.md, section 12): on the head that carries
    M's and M2's commitments, the candidates are exactly their committed reveals, however many
    uncommitted blocks (an uncommitted update, a copy, a perturbed copy) are kept beside them;
    with no committed block kept, the one uncommitted block with the largest claimed validation gain."""
    first = Decision(story.first, story.first_state, story.first_commit, ())
    decided = DecidedChain(story.scenario.chain, first, story.first_voters)
    decided.on_tick(story.first.header.timestamp + 60)
    uncommitted = [story.uncommitted, story.copy, story.perturbed_copy]
    for block in uncommitted:
        decided.on_training_block(block)
    best = max(uncommitted, key=lambda b: training_body(b).loss_before - training_body(b).loss_after)
    assert decided.get_training_candidates() == [best]
    decided.on_training_block(story.second_committed)
    decided.on_training_block(story.committed)
    assert set(decided.get_training_candidates()) == {story.committed, story.second_committed}


def test_a_proposer_awaits_the_next_commitment_of_each_miner_that_revealed_its_committed_update(story: Story) -> None:
    """`get_awaited_miners` (node policy, docs/spec.md section 12): on the head that carries M's,
    M2's and L's commitments, a miner is awaited once it revealed its committed update (not L,
    which has not; not N, whose update no commitment covers), until its commitment for the next
    height arrives."""
    first = Decision(story.first, story.first_state, story.first_commit, ())
    decided = DecidedChain(story.scenario.chain, first, story.first_voters)
    decided.on_tick(story.first.header.timestamp + 60)
    assert get_awaited_miners(decided) == set()
    decided.on_training_block(story.uncommitted)
    assert get_awaited_miners(decided) == set()
    decided.on_training_block(story.committed)
    decided.on_training_block(story.second_committed)
    assert get_awaited_miners(decided) == {story.miner.public_key, story.second_miner.public_key}
    slices = story.scenario.chain.genesis.partition.slices
    next_slice = compute_next_slice(2, slices)
    decided.on_commitment(commit_to(story.scenario, story.miner, 2, next_slice, np.zeros(8, dtype="<i2")))
    assert get_awaited_miners(decided) == {story.second_miner.public_key}
