"""The network simulation: scenario files, and scenarios run on real node processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
    out = tmp_path / "honest"
    completed = run_potchain("sim", "--scenario", str(SCENARIOS / "honest.toml"), "--out", str(out), timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    check_decided_chain(report, 10)
    assert report["invalid_blocks_finalized"] == 0 and report["evidence_included"] == 0
    assert "seed 7" in completed.stderr
    for image in IMAGES:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{image}"' in (out / "report.html").read_text()


@pytest.mark.slow
def test_adversarial_scenario(tmp_path: Path) -> None:
    """One byzantine validator of four (equivocating, two proposals in its rounds), three
    adversaries without stake, a partition of the validators in half, a restart of every node."""
    from sim.scenario import ADVERSARIES

    out = tmp_path / "adversarial"
    completed = run_potchain("sim", "--scenario", str(SCENARIOS / "adversarial.toml"), "--out", str(out),
                             timeout=900)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    check_decided_chain(report, 12)
    assert report["invalid_blocks_finalized"] == 0
    details = report["details"]
    assert {event["action"] for event in details["timeline"]} == {"latency", "partition", "heal", "restart-all"}
    restart = next(event for event in details["timeline"] if event["action"] == "restart-all")
    assert restart["killed"] == 7 and restart["voting_height"] is not None
    actions = details["adversarial_actions"]
    assert {action["adversary"] for action in actions} == set(ADVERSARIES)
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
    assert sum(len(a["blocks"]) for a in actions if a["adversary"] == "variant-spammer") >= 3
    html = (out / "report.html").read_text()
    assert all(kind in html for kind in ADVERSARIES)


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
