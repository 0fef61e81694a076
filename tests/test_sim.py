"""The network simulation: scenario files, and scenarios run on real node processes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from sim.runner import TRAINING_SPLIT_KINDS
from sim.scenario import ScenarioError, load_scenario
from tests.conftest import ROOT, run_potchain

SCENARIOS = ROOT / "sim" / "scenarios"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = 1", "name: expected"),
        ('name = "x"\nseed = 1\nfinalize = 2\n', "missing 'node'"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\nvalidators = [9]\n', "9 is out of range 0..3"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\nmine = 1\n', "expected <class 'bool'>"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\nadversary = "ghost"\n', "adversary: 'ghost'"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\ncolour = "red"\n', "unknown field(s) colour"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\n[[event]]\nat = 1\naction = "explode"\n', "'explode'"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\n[[event]]\nat = 1\naction = "crash"\n', "crash needs nodes"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\n[[event]]\nat = 1\naction = "latency"\nms = -1\n', "0 <= ms"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\nvalidators = [0]\n[[node]]\nvalidators = [0]\n', "two nodes"),
        ('name = "x"\nseed = 1\nfinalize = 2\nupdates = -1\n[[node]]\n', "updates at least 0"),
        ('name = "x"\nseed = 1\nfinalize = 2\n[[node]]\nadversary = "false-attester"\n', "'false-attester'"),
        ('name = "x"\nseed = 1\nfinalize = 2\nproposal_wait = 601\n[[node]]\n', "from 0 to 600 seconds, got 601"),
        ('name = "x"\nseed = 1\nfinalize = 2\nproposal_wait = "long"\n[[node]]\n', "proposal_wait: expected"),
    ],
)
def test_a_bad_scenario_is_refused_with_its_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_scenario(path, 4)


def test_the_shipped_scenarios_load() -> None:
    for path in SCENARIOS.glob("*.toml"):
        scenario = load_scenario(path, 4)
        assert scenario.honest_nodes
    paced = [load_scenario(SCENARIOS / f"{name}.toml", 4) for name in ("one-miner", "four-miners")]
    assert [scenario.proposal_wait for scenario in paced] == [30.0, 30.0]  # compared at equal heights: one pace


IMAGES = ("loss.png", "propagation.png", "finality.png", "heights.png", "peers.png", "rounds.png")


def check_decided_chain(report: dict[str, Any], finalize: int) -> None:
    """What every scenario's report must show: one decided chain, valid everywhere, and a better model."""
    assert report["finalized_height"] >= finalize
    assert report["conflicting_decisions"] == 0
    assert report["honest_nodes_agree"] is True
    assert report["honest_node_crashes"] == 0 and report["stored_chains_valid"] is True
    assert report["test_loss_head"] < report["test_loss_genesis"]
    assert report["confirmed_updates"] >= 1
    rounds = report["rounds_per_height"]
    assert len(rounds) == report["finalized_height"] and all(r >= 1 for r in rounds)
    chain = report["details"]["chain"]
    assert [block["height"] for block in chain] == list(range(1, report["finalized_height"] + 1))
    assert all(block["kind"] == "decided" and block["commit"]["height"] == block["height"] for block in chain)


@pytest.mark.slow
def test_honest_scenario(tmp_path: Path) -> None:
    # The shipped scenario runs ten heights; five show the same (and keep the suite short).
    assert "\nfinalize = 10\n" in (SCENARIOS / "honest.toml").read_text()
    out = tmp_path / "honest"
    completed = run_potchain("sim", "--scenario", str(SCENARIOS / "honest.toml"), "--out", str(out),
                             "--finalize", "5", timeout=900)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    check_decided_chain(report, 5)
    assert report["invalid_blocks_finalized"] == 0 and report["evidence_included"] == 0
    assert "seed 7" in completed.stderr
    page = (out / "report.html").read_text()
    for image in IMAGES:
        png = (out / image).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page  # stands alone when moved
    assert page.count('src="') == len(IMAGES)
    assert "{'" not in page and "['" not in page  # values written out for people, not Python reprs


@pytest.mark.slow
def test_adversarial_scenario(tmp_path: Path) -> None:
    """One byzantine validator of four (equivocating, two proposals in its rounds), three
    adversaries without stake, a partition of the validators in half, a restart of every node."""
    from sim.scenario import ADVERSARIES

    out = tmp_path / "adversarial"
    completed = run_potchain("sim", "--scenario", str(SCENARIOS / "adversarial.toml"), "--out", str(out),
                             timeout=1080)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    check_decided_chain(report, 12)
    assert report["invalid_blocks_finalized"] == 0
    details = report["details"]
    assert {event["action"] for event in details["timeline"]} == {"latency", "partition", "heal", "restart-all"}
    restart = next(event for event in details["timeline"] if event["action"] == "restart-all")
    assert restart["killed"] == 11 and restart["voting_height"] is not None
    actions = details["adversarial_actions"]
    acted = {action["adversary"] for action in actions}
    assert acted <= set(ADVERSARIES)
    # The adversaries that act on their own always act; those that race the proposer with a
    # commitment (or copy one that did) act only when their commitments reach a block in time,
    # which on a loaded 2-core machine may not happen in twelve heights: at least one of them must.
    assert {"equivocator", "false-claims", "withholder"} <= acted
    assert acted & {"variant-spammer", "overfitter", "public-data", "copier", "perturbing-copier", "colluder"}
    assert all(action["outcome"] for action in actions)
    assert not any("FINALIZED" in action["outcome"] for action in actions)
    # The equivocator signed conflicting messages; its evidence is in a decided block and it lost its stake.
    equivocations = [a for a in actions if a["adversary"] == "equivocator"]
    assert {a["kind"] for a in equivocations} & {"prevote", "precommit"}
    assert all(a["outcome"].startswith("slashed: stake 0") for a in equivocations)
    assert report["equivocators_slashed"] is True
    [equivocator] = details["equivocators"]
    assert equivocator["stake"] == 0 and equivocator["evidence_included_at"]
    assert {e["validator"] for e in details["evidence"]} == {equivocator["validator"]}
    if "variant-spammer" in acted:  # it varies its miner's reveals: it acts when one reaches a block
        assert sum(len(a["blocks"]) for a in actions if a["adversary"] == "variant-spammer") >= 3
    # The out-of-sample check's adversaries: judged on an honest node's stored chain.
    assert report["copier_rewards"] == 0
    # Which updates are applied follows from held-out gains alone: at each height, committed
    # candidates only, the one that gains most out of sample among them (combined with the next
    # best-ranked where that loses less), whoever trained them. The overfitter (trained on the
    # public validation split) never displaces an honest update that gains more out of sample.
    named_at: dict[int, list[dict[str, Any]]] = {}
    for update in details["updates"]:
        named_at.setdefault(update["decided_at"], []).append(update)
    for named in named_at.values():
        gaining = [u["test_gain"] for u in named if u["committed"] and u["test_gain"] > 0]
        applied = [u for u in named if u["applied"]]
        if gaining:
            assert applied and all(u["committed"] and u["test_gain"] > 0 for u in applied), named
            assert max(u["test_gain"] for u in applied) == max(gaining), named
    assert report["overfit_updates_decided"] == sum(
        1 for named in named_at.values() for u in named
        if u["kind"] == "overfitter" and u["applied"]
        and any(v["kind"] in TRAINING_SPLIT_KINDS and v["committed"] and not v["applied"]
                and v["test_gain"] > u["test_gain"] for v in named)
    )  # fmt: skip
    assert report["overfit_updates_decided"] == 0
    assert report["heldout_sequences_revealed"] > 0
    assert report["heldout_loss_finalized"] < report["heldout_loss_genesis"]
    updates = [a for a in actions if a.get("update")]
    assert updates
    assert all(a["outcome"] for a in updates)
    html = (out / "report.html").read_text()
    assert all(kind in html for kind in ADVERSARIES)
    assert "The model&#x27;s text" in html or "The model's text" in html
    assert "Updates judged out of sample" in html and "Colluders" in html


def test_model_mode_reports_propagation_and_finality(tmp_path: Path) -> None:
    out = tmp_path / "model"
    completed = run_potchain("sim", "--mode", "model", "--nodes", "60", "--rounds", "2", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["nodes"] == 60 and report["rounds"] == 2
    for key in ("propagation_seconds", "finality_lag_seconds", "round_seconds"):
        assert 0 < report[key]["median"] <= report[key]["p90"] <= report[key]["max"]
    assert all(m["training_bytes"] > 0 and m["training_validate_seconds"] > 0 for m in report["measured"])
    # Heights decided by the real voting machines; a node checks a height with four evaluations
    # (the training block's two, the decided block's out-of-sample test's two).
    assert report["voting_rounds_per_height"] == [0, 0]
    assert all(m["training_evaluations"] == 2 and m["decided_evaluations"] == 2 for m in report["measured"])
    assert report["evaluations_per_height_per_node"] == 4
    assert report["finality_lag_seconds"]["median"] > report["propagation_seconds"]["median"]
    assert run_potchain("sim", "--mode", "model", "--nodes", "3", "--out", str(out)).returncode == 2


# --- the out-of-sample check's adversaries: the report's fields, from a small stored chain ---------


def test_a_perturbation_stays_small() -> None:
    import numpy as np

    from sim.adversaries.copier import MAX_PERTURBATION, PERTURBED_FRACTION, perturb

    values = np.arange(-500, 500, dtype=np.int16)
    moved = perturb(values, b"block").astype(np.int64) - values
    assert (moved != 0).sum() == int(values.size * PERTURBED_FRACTION)
    assert np.abs(moved[moved != 0]).min() >= 1 and np.abs(moved).max() <= MAX_PERTURBATION
    assert (perturb(values, b"block") == perturb(values, b"block")).all()


def test_the_adversarial_scenario_keeps_equivocating_stake_below_a_third() -> None:
    scenario = load_scenario(SCENARIOS / "adversarial.toml", 4)
    kinds = {node.adversary for node in scenario.nodes}
    assert {"overfitter", "public-data", "copier", "perturbing-copier", "colluder"} <= kinds
    equivocating = [v for node in scenario.nodes if node.adversary == "equivocator" for v in node.validators]
    assert 3 * len(equivocating) < 4
    colluding = [v for node in scenario.nodes if node.adversary == "colluder" for v in node.validators]
    assert colluding and not set(colluding) & set(equivocating)


def test_updates_are_judged_from_the_stored_chain(tmp_path: Path) -> None:
    """Height 1 carries an overfitter's commitment; height 2 names its reveal (committed), an honest
    miner's block and a copier's copy of it (both uncommitted). The judgement reads what the chain did."""
    import numpy as np

    from chain.blocks import DecidedBody, TrainingBody, compute_update_hash, sign_update_commitment
    from chain.crypto import devnet_key
    from consensus.decisions import propose_decided_block
    from consensus.proposals import propose_training_block
    from consensus.rules import compute_next_slice
    from sim.adversaries.copier import copier_key
    from sim.runner import MinerRole, judge_updates_in_store, update_outcome
    from tests.chain_builders import Scenario as ChainScenario
    from tests.chain_builders import certificate, devnet_test_shard
    from training.miner import Miner, TrainingConfig

    built = ChainScenario.create(tmp_path / "node")
    node, chain, validators = built.node, built.chain, built.validators
    overfitter, honest = devnet_key("overfitter-test"), built.miner
    slices = node.genesis.partition.slices
    _, first_state = built.genesis()
    config = TrainingConfig(steps=8, batch_sequences=16, warmup_steps=1)
    weights = chain.weights(first_state)
    slice_id = compute_next_slice(1, slices)
    values = Miner(weights, chain.layout, built.train_text, config).work(weights, slice_id, b"seed").values
    update_hash = compute_update_hash(overfitter.public_key, slice_id, values.astype("<i2").tobytes())
    commitment = sign_update_commitment(overfitter, chain.domain, 1, update_hash)

    def decide(proposer_index: int, training: list[Any], commitments: list[Any]) -> Any:
        head = node.head()
        proposer = validators[proposer_index]
        block = propose_decided_block(chain, head.block, head.state, proposer, training, head.commit,
                                      node.decided.head_validators, (), devnet_test_shard(proposer.public_key),
                                      commitments)  # fmt: skip
        node.import_decided(block, certificate(node, block, validators), {t.hash: t for t in training})
        return block

    first = decide(0, [], [commitment])
    state = node.head().state
    revealed = propose_training_block(chain, first, state, overfitter, values, first.header.timestamp + 1, 8)
    honest_block = built.valid_training_block(first, state, miner=honest)
    copier = copier_key("node9")
    honest_values = np.frombuffer(honest_block.body.weights, dtype="<i2")  # type: ignore[union-attr]
    copy = propose_training_block(chain, first, state, copier, honest_values, first.header.timestamp + 1, 8)
    second = decide(1, [revealed, honest_block, copy], [])
    body = second.body
    assert isinstance(body, DecidedBody) and body.test is not None
    final_state = node.head().state
    node.close()

    roles = {overfitter.public_key: MinerRole("node7", "overfitter"), honest.public_key: MinerRole("node0", "honest"),
             copier.public_key: MinerRole("node9", "copier")}  # fmt: skip
    judged = judge_updates_in_store(tmp_path / "node" / "chain", node.genesis, 2, roles,
                                    {validators[1].public_key: "node1"})  # fmt: skip
    by_hash = {entry["hash"]: entry for entry in judged["updates"]}
    assert set(by_hash) == {revealed.hash.hex(), honest_block.hash.hex(), copy.hash.hex()}
    assert [by_hash[b.hash.hex()]["committed"] for b in (revealed, honest_block, copy)] == [True, False, False]
    assert [by_hash[b.hash.hex()]["kind"] for b in (revealed, honest_block, copy)] == ["overfitter", "honest", "copier"]
    assert all(entry["decided_at"] == 2 for entry in by_hash.values())
    assert all(by_hash[v.training_block.hex()]["test_gain"] == body.gain_of(v.training_block) for v in body.training)
    applied = [entry for entry in by_hash.values() if entry["applied"]]
    assert {entry["hash"] for entry in applied} == {h.hex() for h in body.applied}
    assert judged["update_heights"][1]["applied"] == [h.hex() for h in body.applied]
    # The only committed update (the overfitter's), if applied, takes the whole miner share.
    miner_share = node.genesis.consensus.block_reward * node.genesis.consensus.miner_share_percent // 100
    for entry in by_hash.values():
        assert entry["paid"] == (miner_share if entry["applied"] and entry["committed"] else 0)
    paid = [r.amount for r in body.rewards if r.address == overfitter.public_key]
    assert paid == ([miner_share] if revealed.hash in body.applied else [])
    # The overfitter's update is committed, the honest one is not: applied (alone) if it gains at
    # all (a win, not an honest committed update displaced).
    overfit_applied = revealed.hash in body.applied
    assert len(body.applied) <= 1  # one committed update: the uncommitted ones are never combined
    assert judged["overfit_updates_decided"] == 0
    assert judged["overfitter_wins_by_heldout_gain"] == (1 if overfit_applied else 0)
    [contest] = judged["overfitter_contests"]
    assert contest["height"] == 2
    assert isinstance(revealed.body, TrainingBody)
    validation_gain = revealed.body.loss_before - revealed.body.loss_after
    test_gain = body.gain_of(revealed.hash)
    want = {"kind": "overfitter", "committed": True, "validation_gain": validation_gain, "test_gain": test_gain,
            "applied": overfit_applied}  # fmt: skip
    assert contest["overfitter"] == [want]
    assert [(r["kind"], r["test_gain"]) for r in contest["rivals"]] == [("honest", body.gain_of(honest_block.hash))]
    assert judged["copier_rewards"] == 0
    assert judged["honest_applied_share"] == (None if not body.applied else float(body.applied == (honest_block.hash,)))
    assert judged["update_heights"][0]["commitments"] == [overfitter.public_key.hex()]
    assert [h["honest_named"] for h in judged["update_heights"]] == [False, True]
    # The losses on every revealed sequence: the genesis model's and the finalized one's, on the same batch.
    sequences = tuple(revealed_sequence.sequence for revealed_sequence in body.test.sequences)
    tokens = len(sequences) * node.genesis.model.context * (1 << 16)
    assert judged["heldout_sequences_revealed"] == len(sequences) == node.genesis.evaluation.test_sequences
    assert judged["heldout_loss_genesis"] == round(chain.loss_on(first_state, sequences) / tokens, 5)
    assert judged["heldout_loss_finalized"] == round(chain.loss_on(final_state, sequences) / tokens, 5)
    if body.applied:
        assert judged["heldout_loss_finalized"] < judged["heldout_loss_genesis"]
    # The report's text samples: the genesis model's and the finalized one's, same prompt, settings and seed.
    from sim.runner import SAMPLE_PROMPT
    from training.sample import SampleSettings, sample_text

    samples = judged["model_samples"]
    settings = SampleSettings(samples["tokens"], samples["temperature"], None, samples["seed"])
    assert samples["prompt"] == SAMPLE_PROMPT
    assert samples["genesis"] == sample_text(chain.weights(first_state), SAMPLE_PROMPT, settings)
    assert samples["finalized"] == sample_text(chain.weights(final_state), SAMPLE_PROMPT, settings)
    assert (samples["genesis"] != samples["finalized"]) == bool(body.applied)
    [colluder] = judged["colluders"]
    assert colluder["heights_proposed"] == [2] and colluder["named_at_own_heights"] == 0
    # Each adversarial action's outcome names what the chain did with it.
    reveal = {"action": "revealed its committed update", "block": revealed.hash.hex(), "height": 2}
    assert update_outcome(reveal, judged["updates"], judged["update_heights"]).startswith(
        f"named at height 2 (committed, test gain {body.gain_of(revealed.hash)})"
    )
    carried = {"action": "committed to an update", "height": 1, "miner": overfitter.public_key.hex()}
    assert update_outcome(carried, judged["updates"], judged["update_heights"]) == (
        "carried by the decided block at height 1"
    )
    missed = {"action": "committed to a copy", "height": 2, "miner": copier.public_key.hex()}
    assert update_outcome(missed, judged["updates"], judged["update_heights"]) == (
        "not carried by the decided block at height 2"
    )


def test_overfitter_summary_counts_displaced_honest_updates() -> None:
    """An overfitter's applied update counts as displacing an honest one only when a committed
    honest candidate at the same height gained more out of sample."""
    from sim.runner import overfitter_summary

    def entry(height: int, kind: str, test_gain: int, applied: bool, committed: bool = True) -> dict[str, Any]:
        return {"decided_at": height, "kind": kind, "committed": committed, "validation_gain": 10,
                "test_gain": test_gain, "applied": applied}  # fmt: skip

    updates = [
        entry(1, "overfitter", 5, True), entry(1, "honest", 9, False),  # displaced a better honest update
        entry(2, "overfitter", 9, True), entry(2, "honest", 5, False),  # a win by a larger held-out gain
        entry(3, "overfitter", 5, True), entry(3, "honest", 9, False, committed=False),  # honest uncommitted
        entry(4, "overfitter", 5, False), entry(4, "variant-spammer", 9, True),  # lost to a training-split miner
        entry(5, "overfitter", 5, True),  # alone: no contest
        entry(6, "overfitter", 5, True), entry(6, "honest", 9, True),  # applied together, combined: neither
    ]  # fmt: skip
    summary = overfitter_summary(updates)
    assert summary["overfit_updates_decided"] == 1
    assert summary["overfitter_wins_by_heldout_gain"] == 2
    assert [c["height"] for c in summary["overfitter_contests"]] == [1, 2, 3, 4, 6]
    assert summary["overfitter_contests"][0]["rivals"] == [
        {"kind": "honest", "committed": True, "validation_gain": 10, "test_gain": 9, "applied": False}
    ]


def test_report_values_are_written_for_people() -> None:
    from sim.report import format_value, render_html

    assert format_value({"p50": 1.23456, "p90": None}) == "p50: 1.235; p90: \u2014"
    assert format_value([1, 2000, True]) == "1, 2,000, yes"
    assert format_value({}) == "\u2014"
    page = render_html({"scenario": "x", "seed": 3}, {"applied_by_kind": {"honest": 2}, "rounds": [1, 2]},
                       {"loss.png": b"\x89PNG"})  # fmt: skip
    assert "honest: 2" in page and "1, 2" in page and "applied by kind" in page
    assert 'src="data:image/png;base64,iVBORw=="' in page
