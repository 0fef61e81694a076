"""The miner on the CPU: trains, publishes only its slice, keeps and restores its state."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from chain.blocks import Block, DecidedBody, Header, Kind, TrainingBody, UpdateCommitment
from chain.files import PUBLIC_MODE, write_atomically
from consensus.genesis import Genesis
from p2p.mining import MiningProgress, PreparedUpdate, find_applied, find_settled
from training.data import sample_batch, seed_from_int
from training.evaluate import CanonicalEvaluator, make_backend
from training.miner import Miner, TrainingConfig
from training.weights import SliceLayout

CONFIG = TrainingConfig(steps=12, batch_sequences=8, warmup_steps=1)


@pytest.fixture(scope="module")
def layout(devnet: Genesis) -> SliceLayout:
    return SliceLayout(devnet.model, devnet.partition)


def test_work_changes_only_the_slice_and_lowers_the_loss(
    devnet: Genesis, layout: SliceLayout, train_text: bytes, validation_text: bytes
) -> None:
    start = devnet.initial_weights()
    miner = Miner(start, layout, train_text, CONFIG)
    work = miner.work(start, 2, b"seed")
    assert work.slice_id == 2 and work.steps == 12
    assert work.values.dtype == np.int16 and work.values.shape == (layout.slice_size(2),)
    updated = layout.apply(start, 2, work.values)
    for other in (0, 1, 3):
        assert np.array_equal(layout.extract(updated, other), layout.extract(start, other))
    batch = sample_batch(validation_text, seed_from_int(5), 16, 128)
    tables = devnet.tables()
    before = CanonicalEvaluator(start, tables, make_backend("cpu-fused")).per_token_losses(*batch).loss_total
    after = CanonicalEvaluator(updated, tables, make_backend("cpu-fused")).per_token_losses(*batch).loss_total
    assert after < before


def test_a_snapshot_holds_the_local_model_s_values_for_every_slice(
    devnet: Genesis, layout: SliceLayout, train_text: bytes
) -> None:
    """What a commit-reveal miner commits from while it trains on: every slice's values as
    `values` gives them, the trained ones away from the chain's."""
    start = devnet.initial_weights()
    miner = Miner(start, layout, train_text, CONFIG)
    assert all(np.array_equal(v, layout.extract(start, s)) for s, v in enumerate(miner.snapshot(start)))
    miner.work(start, 1, b"seed")
    snapshot = miner.snapshot(start)
    assert len(snapshot) == devnet.partition.slices
    for slice_id, values in enumerate(snapshot):
        assert np.array_equal(values, miner.values(start, slice_id))
        assert not np.array_equal(values, layout.extract(start, slice_id))  # the "model" scheme trains every slice


def test_rebasing_keeps_the_miner_s_progress_and_adds_the_chain_s_changes(
    devnet: Genesis, layout: SliceLayout, train_text: bytes
) -> None:
    start = devnet.initial_weights()
    miner = Miner(start, layout, train_text, CONFIG)
    miner.work(start, 0, b"one")
    local = {name: p.detach().clone() for name, p in miner.model.named_parameters()}
    name = "h.0.mlp.c_fc.weight"
    index = torch.tensor(layout.indices[1][name])
    progress = local[name].view(-1)[index] - start.real(name).view(-1)[index]
    assert progress.abs().max() > 0  # the "model" scheme trained slice 1 too, locally
    # Another miner's update of slice 1 lands on the chain: this miner moves by the chain's
    # change and keeps its own progress on top.
    other = layout.apply(start, 1, (layout.extract(start, 1) // 2).astype(np.int16))
    miner.adopt(other)
    rebased = miner.model.state_dict()[name].view(-1)[index]
    assert torch.allclose(rebased, other.real(name).view(-1)[index] + progress, atol=1e-6)
    index_3 = torch.tensor(layout.indices[3][name])
    assert torch.equal(miner.model.state_dict()[name].view(-1)[index_3], local[name].view(-1)[index_3])
    # Once the chain applied our own values for slice 2 (combined with another miner's, say),
    # the next rebase adds only the others' part of the change.
    ours = miner.values(other, 2)
    combined = ((ours.astype(np.int32) + layout.extract(other, 2) + 1) // 2).astype(np.int16)
    index_2 = torch.tensor(layout.indices[2][name])
    before = miner.model.state_dict()[name].view(-1)[index_2].clone()
    miner.published(2, ours)
    miner.adopt(layout.apply(other, 2, combined))
    change = part_of(layout, 2, name, combined.astype(np.int32) - ours)
    expected = before + torch.from_numpy(change.astype(np.float32)) * float(2.0 ** -start.exponents[name])
    assert torch.allclose(miner.model.state_dict()[name].view(-1)[index_2], expected, atol=1e-6)


def test_a_rebase_after_our_values_are_recorded_moves_nothing_and_before_it_counts_them_twice(
    devnet: Genesis, layout: SliceLayout, train_text: bytes
) -> None:
    start = devnet.initial_weights()
    name = "h.0.mlp.c_fc.weight"
    index = torch.tensor(layout.indices[2][name])
    for recorded_first in (True, False):
        miner = Miner(start, layout, train_text, CONFIG)
        miner.work(start, 2, b"one")
        ours = miner.values(start, 2)
        local = miner.model.state_dict()[name].view(-1)[index].clone()
        if recorded_first:  # the chain applied our values for slice 2, and we know it: nothing moves
            miner.published(2, ours)
        miner.adopt(layout.apply(start, 2, ours))
        moved = miner.model.state_dict()[name].view(-1)[index]
        if recorded_first:
            assert torch.equal(moved, local)
        else:  # taken for another miner's change: our progress is added a second time
            progress = torch.from_numpy(part_of(layout, 2, name, ours.astype(np.int32) - layout.extract(start, 2)))
            expected = local + progress.to(torch.float32) * float(2.0 ** -start.exponents[name])
            assert torch.allclose(moved, expected, atol=1e-6) and not torch.allclose(moved, local)
    # So the node's training loop starts a round on a head only once its mining loop acted on it.
    mining = MiningProgress(head=b"old head")
    assert not mining.may_train_on(b"new head")
    mining.head = b"new head"
    assert mining.may_train_on(b"new head")
    mining.trained_on = b"new head"
    assert not mining.may_train_on(b"new head")


def part_of(layout: SliceLayout, slice_id: int, name: str, values: np.ndarray) -> np.ndarray:
    """The values of one tensor's elements in a slice's values (tensors in canonical order)."""
    offset = 0
    for tensor, index in layout.indices[slice_id].items():
        if tensor == name:
            return values[offset : offset + len(index)]
        offset += len(index)
    raise KeyError(name)


def test_without_rebasing_the_miner_takes_the_chain_s_values(
    devnet: Genesis, layout: SliceLayout, train_text: bytes
) -> None:
    start = devnet.initial_weights()
    miner = Miner(start, layout, train_text, replace(CONFIG, rebase=False))
    miner.work(start, 0, b"one")
    name = "h.0.mlp.c_fc.weight"
    index = torch.tensor(layout.indices[1][name])
    other = layout.apply(start, 1, (layout.extract(start, 1) // 2).astype(np.int16))
    miner.adopt(other)
    assert torch.equal(miner.model.state_dict()[name].view(-1)[index], other.real(name).view(-1)[index])


def test_slice_scheme_trains_only_the_assigned_slice(devnet: Genesis, layout: SliceLayout, train_text: bytes) -> None:
    start = devnet.initial_weights()
    miner = Miner(start, layout, train_text, TrainingConfig(steps=5, batch_sequences=8, scheme="slice"))
    miner.work(start, 3, b"seed")
    name = "h.1.attn.c_attn.weight"
    moved = (miner.model.state_dict()[name].view(-1) != start.real(name).view(-1)).nonzero().view(-1)
    assert set(moved.tolist()) <= set(layout.indices[3][name].tolist()) and len(moved) > 0


def test_state_survives_save_and_load(devnet: Genesis, layout: SliceLayout, train_text: bytes, tmp_path: Path) -> None:
    start = devnet.initial_weights()
    miner = Miner(start, layout, train_text, CONFIG)
    miner.work(start, 1, b"seed")
    write_atomically(tmp_path / "miner.pt", miner.state_bytes(), PUBLIC_MODE)
    restored = Miner(start, layout, train_text, CONFIG)
    restored.load(tmp_path / "miner.pt")
    assert restored.steps_done == miner.steps_done
    for kept, saved in zip(restored.base, miner.base, strict=True):
        assert kept is not None and saved is not None and np.array_equal(kept, saved)
    for (name, a), (_, b) in zip(miner.model.state_dict().items(), restored.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    first = miner.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(first, restored.optimizer.state_dict()["state"][0]["exp_avg"])
    assert [p.name for p in tmp_path.iterdir()] == ["miner.pt"]


def test_cuda_without_cuda_is_a_clear_error(devnet: Genesis, layout: SliceLayout, train_text: bytes) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        Miner(devnet.initial_weights(), layout, train_text, TrainingConfig(device="cuda"))


def _block(height: int, kind: Kind, body: DecidedBody | TrainingBody, parent: bytes = bytes(32)) -> Block:
    header = Header("test", height, parent, kind, 1_795_000_000 + height, bytes(32), bytes(32), bytes(32))
    return Block(header, body)


def test_applied_updates_are_found_in_heights_the_miner_skipped() -> None:
    """A head that moved by two heights: the update the skipped height applied is ours too."""
    ours = [
        _block(height, Kind.TRAINING, TrainingBody(slice_id, bytes(8), 10, 5, 30, bytes(32)))
        for height, slice_id in ((4, 0), (5, 1), (6, 2))
    ]
    decided = {
        height: _block(height, Kind.DECIDED, DecidedBody((), None, (), None, applied=applied))
        for height, applied in ((4, (ours[0].hash,)), (5, ()), (6, (ours[2].hash,)))
    }
    revealed = {block.hash: block for block in ours}
    found = find_applied(revealed, decided[6], decided.get)
    assert [(block.hash, judge.header.height) for block, judge in found] == [(ours[0].hash, 4), (ours[2].hash, 6)]
    assert find_applied(revealed, decided[4], decided.get) == [(ours[0], decided[4])]  # 5 and 6 not judged yet
    assert find_applied(revealed, decided[5], lambda height: None) == []  # a height the node lacks: nothing


def test_values_applied_above_the_head_a_round_rebases_onto_are_told_to_a_later_round(
    devnet: Genesis, layout: SliceLayout, train_text: bytes
) -> None:
    """Height 5 applied our slice-2 values while a round was about to rebase onto height 4's
    weights (read late: the node's lock was held). Told at once, the rebase takes height 4's
    older values for another miner's change and subtracts our progress; queued until a round
    on height 5 (`SettledValues.take`), nothing moves either time."""
    start = devnet.initial_weights()  # height 4's weights: slice 2 as it was before ours
    name = "h.0.mlp.c_fc.weight"
    index = torch.tensor(layout.indices[2][name])
    miners = [Miner(start, layout, train_text, CONFIG) for _ in range(2)]
    for miner in miners:
        miner.work(start, 2, b"one")
    ours = miners[0].values(start, 2)
    local = miners[0].model.state_dict()[name].view(-1)[index].clone()
    told_at_once, queued = miners
    assert torch.equal(queued.model.state_dict()[name].view(-1)[index], local)

    told_at_once.published(2, ours)
    told_at_once.adopt(start)
    assert not torch.allclose(told_at_once.model.state_dict()[name].view(-1)[index], local)

    mining = MiningProgress()
    mining.settled.record(5, 2, ours)
    assert mining.settled.take(4) == []
    queued.adopt(start)
    assert torch.equal(queued.model.state_dict()[name].view(-1)[index], local)
    for slice_id, values in mining.settled.take(5):
        queued.published(slice_id, values)
    queued.adopt(layout.apply(start, 2, ours))  # height 5's weights
    assert torch.equal(queued.model.state_dict()[name].view(-1)[index], local)
    assert mining.settled.take(9) == []


def _offer(height: int, slice_id: int) -> PreparedUpdate:
    commitment = UpdateCommitment(height, bytes(32), bytes(32), bytes(64))
    return PreparedUpdate(commitment, slice_id, bytes(8), 30, 1)


def test_an_offer_is_settled_by_whatever_its_judging_block_applies() -> None:
    """Offers for blocks 3, 4 and 5 are judged by blocks 4, 5 and 6: block 4 applied another
    miner's update (settled: theirs replaces ours), block 5 applied nothing (not settled: the
    model keeps its progress), block 6 applied ours; the head at 6 settles 3 and 5, at 5 only 3."""
    offers = {height: _offer(height, height % 4) for height in (3, 4, 5)}
    theirs, ours = bytes([1]) * 32, bytes([2]) * 32
    decided = {
        height: _block(height, Kind.DECIDED, DecidedBody((), None, (), None, applied=applied))
        for height, applied in ((4, (theirs,)), (5, ()), (6, (ours,)))
    }
    found = find_settled(offers, decided[6], decided.get)
    assert [(offer.height, judge.header.height) for offer, judge in found] == [(3, 4), (5, 6)]
    assert [offer.height for offer, _ in find_settled(offers, decided[5], decided.get)] == [3]  # 5 not judged yet
    assert find_settled(offers, decided[6], lambda height: None) == [(offers[5], decided[6])]  # 4 unknown: skipped


def test_a_miner_whose_offer_lost_takes_the_chain_s_values_and_keeps_its_later_progress(
    devnet: Genesis, layout: SliceLayout, train_text: bytes
) -> None:
    """Two miners offer slice 2 from the same start; the chain applies the winner's. Settled
    (its offer recorded as the slice's base), the loser's slice becomes the chain's values plus
    what it trained after offering; rebased from the old base instead, it also keeps the progress
    it offered, now on top of the winner's change toward the same data."""
    start = devnet.initial_weights()
    name = "h.0.mlp.c_fc.weight"
    index = torch.tensor(layout.indices[2][name])
    winner, settled, drifting = (Miner(start, layout, train_text, CONFIG) for _ in range(3))
    winner.work(start, 2, b"winner")
    settled.work(start, 2, b"loser")
    drifting.work(start, 2, b"loser")
    won, offer = winner.values(start, 2), settled.values(start, 2)
    chain = layout.apply(start, 2, won)
    settled.published(2, offer)
    for miner in (settled, drifting):
        miner.train(1, b"after")  # progress made after the offer: kept either way
    after = settled.model.state_dict()[name].view(-1)[index].clone()
    assert torch.equal(after, drifting.model.state_dict()[name].view(-1)[index])
    settled.adopt(chain)
    drifting.adopt(chain)
    scale = float(2.0 ** -start.exponents[name])
    later = after - torch.from_numpy(part_of(layout, 2, name, offer)).to(torch.float32) * scale
    expected = torch.from_numpy(part_of(layout, 2, name, won)).to(torch.float32) * scale + later
    assert torch.allclose(settled.model.state_dict()[name].view(-1)[index], expected, atol=1e-6)
    offered = torch.from_numpy(part_of(layout, 2, name, offer.astype(np.int32) - layout.extract(start, 2)))
    kept_offer = expected + offered.to(torch.float32) * scale
    assert torch.allclose(drifting.model.state_dict()[name].view(-1)[index], kept_offer, atol=1e-6)
    assert not torch.allclose(kept_offer, expected, atol=1e-3)
