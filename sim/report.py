"""The simulation report: report.json (the numbers) and report.html (the plots and tables).

Plots are PNG files made with matplotlib (Agg backend, no display), also
embedded in report.html (data: URIs), so the page stands alone when moved:
loss.png (validation and test loss against height, next to the centralized
baseline at the same optimizer steps), propagation.png (blocks' arrival
delays), finality.png (decision times: the seconds each height took; every
decided block is final), heights.png (each honest node's decided height
over time, faults marked), peers.png (every node's score of every peer) and
rounds.png (the voting rounds each height took: its commit's round + 1).
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def summarize(data: dict[str, Any], genesis_losses: tuple[float, float]) -> dict[str, Any]:
    """The headline numbers of a run."""
    chain = data.get("chain", [])
    rounds = [r for r in data.get("rounds_per_height", []) if r is not None]
    head = chain[-1] if chain else None
    named = [t for b in chain for t in b["training_blocks"]]
    return {
        "finalized_height": data.get("finalized_height", 0),
        "conflicting_decisions": data.get("conflicting_decisions"),
        "honest_nodes_agree": data.get("honest_nodes_agree", False),
        "invalid_blocks_finalized": data.get("invalid_blocks_finalized", 0),
        "equivocators_slashed": data.get("equivocators_slashed"),  # None: no equivocator
        "evidence_included": len(data.get("evidence", [])),
        "honest_node_crashes": data.get("honest_node_crashes", 0),
        "stored_chains_valid": data.get("stored_chains_valid", False),
        "validation_loss_genesis": genesis_losses[0],
        "test_loss_genesis": genesis_losses[1],
        "validation_loss_head": head["validation_loss"] if head and head["validation_loss"] is not None
        else genesis_losses[0],
        "test_loss_head": head["test_loss"] if head and head["test_loss"] is not None else genesis_losses[1],
        "confirmed_updates": sum(1 for t in named if t["confirmed"]),
        "rejected_updates": sum(1 for t in named if not t["confirmed"]),
        "heights_without_update": sum(1 for b in chain if not b["training_blocks"]),
        "rounds_per_height": data.get("rounds_per_height", []),
        "heights_decided_in_round_0": sum(1 for r in rounds if r == 1),
        "max_rounds_per_height": max(rounds, default=None),
        "propagation_seconds": percentiles(arrival_delays(blocks_with_arrivals(chain), data.get("node_starts", {}))),
        "decision_seconds": percentiles([seconds for _, seconds in decision_times(chain)]),
        "finality_lag_seconds": percentiles([lag for _, lag in finality_lags(chain)]),
        "seconds": data.get("seconds"),
        # The out-of-sample check's adversaries (None: the run did not get as far as judging them).
        "overfit_updates_decided": data.get("overfit_updates_decided"),
        "overfitter_wins_by_heldout_gain": data.get("overfitter_wins_by_heldout_gain"),
        "copier_rewards": data.get("copier_rewards"),
        "heldout_sequences_revealed": data.get("heldout_sequences_revealed"),
        "heldout_loss_genesis": data.get("heldout_loss_genesis"),
        "heldout_loss_finalized": data.get("heldout_loss_finalized"),
        "honest_applied_share": data.get("honest_applied_share"),
        "applied_by_kind": data.get("applied_by_kind"),
    }  # fmt: skip


def blocks_with_arrivals(chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decided blocks and the training blocks they name (each with its arrival times)."""
    return [*chain, *(t for b in chain for t in b["training_blocks"])]


def arrival_delays(chain: list[dict[str, Any]], starts: dict[str, list[float]]) -> list[float]:
    """Seconds from each block's first arrival on any node to its arrival on each other node,
    leaving out nodes that (re)started in between (they synced the block, it did not propagate)."""
    delays = []
    for block in chain:
        if len(block["arrivals"]) < 2:
            continue
        first = min(block["arrivals"].values())
        for name, arrival in block["arrivals"].items():
            if arrival > first and not any(first <= start <= arrival for start in starts.get(name, [])):
                delays.append(round(arrival - first, 4))
    return sorted(delays)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "max": round(ordered[-1], 4),
    }


def decision_times(chain: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(height, seconds from the first decision of the height before to the first decision of this one)."""
    times = []
    for before, after in itertools.pairwise(chain):
        if before.get("decided_at") is not None and after.get("decided_at") is not None:
            times.append((after["height"], round(max(0.0, after["decided_at"] - before["decided_at"]), 3)))
    return times


def finality_lags(chain: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(height, seconds from a named training block's first arrival anywhere to its decided block's):
    a decided block is final at once, so this is how long an update waits for its verdict."""
    lags = []
    for block in chain:
        for training in block["training_blocks"]:
            if training["arrivals"] and block["arrivals"]:
                first = min(training["arrivals"].values())
                lags.append((block["height"], round(min(block["arrivals"].values()) - first, 3)))
    return lags


def baseline_at(baseline: list[dict[str, Any]], steps: float, key: str) -> float | None:
    """The baseline's loss at `steps`, interpolated."""
    for before, after in itertools.pairwise(baseline):
        if before["steps"] <= steps <= after["steps"]:
            span = after["steps"] - before["steps"] or 1
            return float(before[key] + (after[key] - before[key]) * (steps - before["steps"]) / span)
    return float(baseline[-1][key]) if baseline else None


def plot_losses(data: dict[str, Any], genesis_losses: tuple[float, float], path: Path) -> None:
    chain, baseline = data.get("chain", []), data.get("baseline", [])
    heights, validation, test, steps = [0], [genesis_losses[0]], [genesis_losses[1]], [0]
    done = 0
    for block in chain:
        done += sum(t["body"].get("steps", 0) for t in block["training_blocks"] if t["confirmed"])
        heights.append(block["height"])
        validation.append(block["validation_loss"] if block["validation_loss"] is not None else genesis_losses[0])
        test.append(block["test_loss"] if block["test_loss"] is not None else genesis_losses[1])
        steps.append(done)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.step(heights, validation, where="post", label="chain: validation loss")
    axes.step(heights, test, where="post", label="chain: test loss")
    confirmed = [(b["height"], t) for b, t in zip(chain, test[1:], strict=True) if b["body"].get("confirmed")]
    if confirmed:
        axes.plot(*zip(*confirmed, strict=True), "s", color="tab:orange", label="an update confirmed")
    if baseline:
        central = [baseline_at(baseline, s, "test_loss") or 0.0 for s in steps]
        axes.step(heights, central, "k--", where="post", label="centralized, same steps: test loss")
    axes.set_xlabel("height")
    axes.set_ylabel("loss (nats per byte)")
    axes.set_title("The model through the chain")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_propagation(data: dict[str, Any], path: Path) -> None:
    chain = data.get("chain", [])
    figure, axes = plt.subplots(figsize=(8, 3.5))
    delays = arrival_delays(blocks_with_arrivals(chain), data.get("node_starts", {}))
    axes.hist(delays or [0.0], bins=30, color="tab:blue")
    axes.set_xlabel("seconds after the block's first arrival anywhere (decided and training blocks)")
    axes.set_ylabel("arrivals")
    axes.set_title("Block propagation")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_finality(data: dict[str, Any], path: Path) -> None:
    times = decision_times(data.get("chain", []))
    figure, axes = plt.subplots(figsize=(8, 3.5))
    axes.bar([h for h, _ in times], [seconds for _, seconds in times], color="tab:green")
    for event in data.get("timeline", []):
        height = next((s["head_height"] for s in data.get("samples", []) if s["seconds"] >= event["seconds"]), None)
        if height is not None:
            axes.axvline(height + 0.5, color="red", alpha=0.4)
            axes.annotate(event["action"], (height + 0.5, 0), rotation=90, fontsize=7, color="red")
    axes.set_xlabel("height")
    axes.set_ylabel("seconds")
    axes.set_title("Decision times: seconds from one height's decision to the next (final at once)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_heights(data: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4))
    samples = data.get("samples", [])
    for node in sorted({s["node"] for s in samples}):
        points = [s for s in samples if s["node"] == node]
        axes.step([s["seconds"] for s in points], [s["head_height"] for s in points], where="post",
                  label=f"node{node}")  # fmt: skip
    for event in data.get("timeline", []):
        axes.axvline(event["seconds"], color="red", alpha=0.4)
        axes.annotate(event["action"], (event["seconds"], 0), rotation=90, fontsize=7, color="red")
    axes.set_xlabel("seconds")
    axes.set_ylabel("decided height")
    axes.set_title("Decided height on each honest node (faults in red)")
    axes.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_peers(data: dict[str, Any], path: Path) -> None:
    nodes = data.get("nodes", [])
    names = sorted(
        {name for n in nodes for name in n["peer_scores"]} | {n["name"] for n in nodes},
        key=lambda name: (len(name), name),
    )  # node2 before node10
    matrix = [[n["peer_scores"].get(name, 0) for name in names] for n in nodes]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(nodes) + 1.8))
    image = axes.imshow(matrix or [[0]], cmap="RdYlGn", vmin=-150, vmax=0, aspect="auto")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(nodes)), [n["name"] for n in nodes], fontsize=7)
    axes.set_title("Peer scores (row: the node scoring; column: the peer)")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_rounds(data: dict[str, Any], path: Path) -> None:
    """The voting rounds each height took (its commit's round + 1): 1 when the first proposer's block was decided."""
    rounds = data.get("rounds_per_height", [])
    figure, axes = plt.subplots(figsize=(8, 3.2))
    heights = [h for h, r in enumerate(rounds, 1) if r is not None]
    axes.bar(heights, [r for r in rounds if r is not None], color="tab:orange")
    axes.set_xlabel("height")
    axes.set_ylabel("rounds")
    axes.set_title("Voting rounds per height (commit round + 1)")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(data: dict[str, Any], genesis_losses: tuple[float, float], out: Path) -> dict[str, Any]:
    """Write report.json, the plots and report.html; returns report.json's content."""
    summary = summarize(data, genesis_losses)
    report = {**summary, "details": data}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plots: dict[str, Callable[[Path], None]] = {
        "loss.png": lambda p: plot_losses(data, genesis_losses, p),
        "propagation.png": lambda p: plot_propagation(data, p),
        "finality.png": lambda p: plot_finality(data, p),
        "heights.png": lambda p: plot_heights(data, p),
        "peers.png": lambda p: plot_peers(data, p),
        "rounds.png": lambda p: plot_rounds(data, p),
    }
    images = {}
    for name, draw in plots.items():
        draw(out / name)
        images[name] = (out / name).read_bytes()
    (out / "report.html").write_text(render_html(data, summary, images))
    return report


def format_value(value: Any) -> str:
    """A value as a person reads it: yes/no, numbers with their digits, lists and mappings
    written out (not as Python reprs), an em dash for nothing."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {format_value(item)}" for key, item in value.items()) or "\u2014"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(item) for item in value) or "\u2014"
    return str(value)


def format_label(key: str) -> str:
    """A report.json key as a table label: `test_loss_head` -> "test loss head"."""
    return key.replace("_", " ")


def render_html(data: dict[str, Any], summary: dict[str, Any], images: dict[str, bytes]) -> str:
    """report.html: the tables and the plots (`images`, PNG bytes by file name, embedded)."""

    def row(cells: list[Any], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(format_value(c))}</{tag}>" for c in cells) + "</tr>"

    headline = "".join(
        f'<tr><th scope="row" title="{html.escape(key)}">{html.escape(format_label(key))}</th>'
        f"<td>{html.escape(format_value(value))}</td></tr>"
        for key, value in summary.items()
    )
    action_rows = "".join(
        row([a["node"], a["adversary"], a.get("action", ""), (a.get("block") or "")[:16], a.get("outcome", ""),
             a.get("sender_scores", "")])
        for a in data.get("adversarial_actions", [])
    )  # fmt: skip
    evidence = "".join(
        row([e["included_at"], e["validator"][:16], e["kind"], e["height"], e["round"]])
        for e in data.get("evidence", [])
    )
    equivocators = "".join(
        row([e["node"], e["validator"][:16], e["stake"], e["evidence_included_at"]])
        for e in data.get("equivocators", [])
    )
    timeline = "".join(
        row([e["seconds"], e["action"], e["nodes"] or e["groups"],
             f"height {e['voting_height']} round {e['voting_round']}" if "voting_height" in e else ""])
        for e in data.get("timeline", [])
    )  # fmt: skip
    nodes = "".join(
        row([n["name"], "yes" if n["honest"] else n.get("adversary", "no"), n["head_height"], n["head_hash"][:16],
             n["test_loss"], n["connected_peers"], len(n["rejections"]), ", ".join(n.get("banned_peers", []))])
        for n in data.get("nodes", [])
    )  # fmt: skip
    updates = "".join(
        row([u["decided_at"], u["hash"][:16], u["node"], u["kind"], "yes" if u["committed"] else "no", u["test_gain"],
             "yes" if u["applied"] else "no", u["paid"]])
        for u in data.get("updates", [])
    )  # fmt: skip
    colluders = "".join(
        row([c["node"], c["validator"][:16], f"{len(c['heights_proposed'])} of {c['heights']}",
             f"{c['applied_at_own_heights']} of {c['named_at_own_heights']}",
             f"{c['applied_elsewhere']} of {c['named_elsewhere']}"])
        for c in data.get("colluders", [])
    )  # fmt: skip
    contests = "".join(
        row([c["height"], e["kind"], e["committed"], e["validation_gain"], e["test_gain"], e["applied"]])
        for c in data.get("overfitter_contests", [])
        for side in ("overfitter", "rivals")
        for e in c[side]
    )
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(name)}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in images.items()
    )
    samples = data.get("model_samples")
    sample_section = (
        f"<h2>The model's text</h2><p>The genesis model and the finalized one continue the same prompt with the same"
        f" settings (temperature {samples['temperature']}, seed {samples['seed']}, {samples['tokens']} bytes):</p>"
        f"<h3>Genesis</h3><pre>{html.escape(samples['prompt'] + samples['genesis'])}</pre>"
        f"<h3>Finalized</h3><pre>{html.escape(samples['prompt'] + samples['finalized'])}</pre>"
        if samples
        else ""
    )
    failure = data.get("failure")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>potchain simulation: {html.escape(str(data.get("scenario")))}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .5rem;font-size:.9rem}}
img{{max-width:100%}}.bad{{color:#b00}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:.5rem}}</style></head><body>
<h1>Scenario {html.escape(str(data.get("scenario")))} (seed {data.get("seed")})</h1>
{f'<p class="bad">The run failed: {html.escape(failure)}</p>' if failure else ""}
<h2>Outcome</h2><table>{headline}</table>
<h2>Plots</h2>{figures}
{sample_section}
<h2>Adversarial actions</h2>
<table>{row(["node", "adversary", "action", "block", "what the network did", "sender's scores"], "th")}
{action_rows}</table>
<h2>Updates judged out of sample</h2>
<p>Every training block a decided block named, from an honest node's stored chain: whether its miner
committed to it in the parent, its gain on the block's held-out sequences, whether it was applied
(the committed one with the best positive gain, else the best uncommitted one) and what its miner was paid
(only a committed update pays). The overfitter's updates applied where a committed update trained on the
training split (the honest miner's or the variant spammer's) named at the same height gained more out of
sample: {summary.get("overfit_updates_decided")} (its wins by a larger held-out gain:
{summary.get("overfitter_wins_by_heldout_gain")}); rewards paid to copier keys: {summary.get("copier_rewards")};
loss on the {summary.get("heldout_sequences_revealed")} held-out sequences revealed so far: genesis model
{summary.get("heldout_loss_genesis")}, finalized model {summary.get("heldout_loss_finalized")} nats per token.</p>
<table>{row(["height", "training block", "node", "miner", "committed", "test gain", "applied", "paid"], "th")}
{updates}</table>
<h3>The overfitter against the miners of the training split</h3>
<p>Every height that named both: the validation gain (on each block's own validation batch, which only admits
it) and the held-out gain (on the proposer's revealed sequences, which decides), in Q.16 loss units.</p>
<table>{row(["height", "miner", "committed", "validation gain", "held-out gain", "applied"], "th")}
{contests}</table>
<h2>Colluders</h2>
<p>A colluding validator's miner trains on that validator's held-out shard. Its updates can win only at the
heights that validator proposes (its stake share of the proposals); they must still meet the difficulty on a
validation batch seeded after they were committed, and at other proposers' heights they are tested on shards
the miner never saw. The sequences it fitted are spent as its validator judges with them.</p>
<table>{
        row(
            [
                "node",
                "validator",
                "heights it proposed",
                "applied of named at its heights",
                "applied of named elsewhere",
            ],
            "th",
        )
    }{colluders}</table>
<h2>Equivocators</h2>
<table>{row(["node", "validator", "stake at the end", "evidence in the blocks at heights"], "th")}{equivocators}</table>
<h2>Evidence in decided blocks</h2>
<table>{row(["included at height", "validator", "messages", "height", "round"], "th")}{evidence}</table>
<h2>Faults</h2><table>{row(["seconds", "action", "nodes", "killed while voting on"], "th")}{timeline}</table>
<h2>Nodes at the end</h2>
<table>{row(["node", "honest", "decided height", "head hash", "test loss", "peers", "rejections", "banned"], "th")}
{nodes}</table>
</body></html>
"""
