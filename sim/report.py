"""The simulation report: report.json (the numbers) and report.html (the plots and tables).

Plots are PNG files made with matplotlib (Agg backend, no display):
loss.png (validation and test loss against height, next to the centralized
baseline at the same optimizer steps), propagation.png, finality.png,
heights.png (each node's finalized height over time, faults marked),
peers.png (every node's score of every peer) and orphans.png (forks: the
valid blocks each node dropped when finality chose another branch).
"""

from __future__ import annotations

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


def summarize(data: dict[str, Any], genesis_losses: tuple[float, float]) -> dict[str, Any]:
    """The headline numbers of a run."""
    chain = data.get("chain", [])
    validations = [b for b in chain if b["kind"] == "validation"]
    delays = sorted(
        arrival - min(b["arrivals"].values())
        for b in chain
        if len(b["arrivals"]) > 1
        for arrival in b["arrivals"].values()
    )
    lags = finality_lags(chain)
    orphaned = {h for node in data.get("nodes", []) for h in node["orphaned_blocks"]}
    head = validations[-1] if validations else None
    return {
        "finalized_height": data.get("finalized_height", 0),
        "honest_nodes_agree": data.get("honest_nodes_agree", False),
        "invalid_blocks_finalized": data.get("invalid_blocks_finalized", 0),
        "honest_node_crashes": data.get("honest_node_crashes", 0),
        "stored_chains_valid": data.get("stored_chains_valid", False),
        "validation_loss_genesis": genesis_losses[0],
        "test_loss_genesis": genesis_losses[1],
        "validation_loss_head": head["validation_loss"] if head else genesis_losses[0],
        "test_loss_head": head["test_loss"] if head else genesis_losses[1],
        "confirmed_updates": sum(1 for b in validations if b["body"].get("confirmed")),
        "rejected_updates": sum(1 for b in validations if not b["body"].get("confirmed")),
        "orphaned_blocks": len(orphaned),
        "propagation_seconds": percentiles(delays),
        "finality_lag_seconds": percentiles([lag for _, lag in lags]),
    }


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


def finality_lags(chain: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(training block height, seconds from its first arrival anywhere to its validation block's)."""
    by_height = {b["height"]: b for b in chain}
    lags = []
    for block in chain:
        after = by_height.get(block["height"] + 1)
        if block["kind"] == "training" and after is not None and block["arrivals"] and after["arrivals"]:
            lags.append((block["height"], round(min(after["arrivals"].values()) - min(block["arrivals"].values()), 3)))
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
        if block["kind"] == "training" and block.get("confirmed"):
            done += block["body"].get("steps", 0)
        if block["kind"] == "validation":
            heights.append(block["height"])
            validation.append(block["validation_loss"])
            test.append(block["test_loss"])
            steps.append(done)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(heights, validation, "o-", label="chain: validation loss")
    axes.plot(heights, test, "s-", label="chain: test loss")
    if baseline:
        central = [baseline_at(baseline, s, "test_loss") or 0.0 for s in steps]
        axes.plot(heights, central, "k--", label="centralized, same steps: test loss")
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
    axes.hist(arrival_delays(chain, data.get("node_starts", {})) or [0.0], bins=30, color="tab:blue")
    axes.set_xlabel("seconds after the block's first arrival anywhere")
    axes.set_ylabel("arrivals")
    axes.set_title("Block propagation")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_finality(data: dict[str, Any], path: Path) -> None:
    lags = finality_lags(data.get("chain", []))
    figure, axes = plt.subplots(figsize=(8, 3.5))
    axes.bar([h for h, _ in lags], [lag for _, lag in lags], color="tab:green")
    axes.set_xlabel("training block height")
    axes.set_ylabel("seconds to finality")
    axes.set_title("Finality lag: training block to its validation block")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_heights(data: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4))
    samples = data.get("samples", [])
    for node in sorted({s["node"] for s in samples}):
        points = [s for s in samples if s["node"] == node]
        axes.step([s["seconds"] for s in points], [s["finalized_height"] for s in points], where="post",
                  label=f"node{node}")  # fmt: skip
    for event in data.get("timeline", []):
        axes.axvline(event["seconds"], color="red", alpha=0.4)
        axes.annotate(event["action"], (event["seconds"], 0), rotation=90, fontsize=7, color="red")
    axes.set_xlabel("seconds")
    axes.set_ylabel("finalized height")
    axes.set_title("Finalized height on each honest node (faults in red)")
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


def plot_orphans(data: dict[str, Any], path: Path) -> None:
    """Blocks each node held and then dropped when finality chose another branch (lost races)."""
    nodes = data.get("nodes", [])
    figure, axes = plt.subplots(figsize=(8, 3.2))
    axes.bar([n["name"] for n in nodes], [len(n["orphaned_blocks"]) for n in nodes], color="tab:orange")
    axes.set_ylabel("orphaned blocks")
    axes.set_title("Forks: valid blocks each node dropped when finality chose another branch")
    axes.tick_params(axis="x", labelsize=7, rotation=45)
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
        "orphans.png": lambda p: plot_orphans(data, p),
    }
    for name, draw in plots.items():
        draw(out / name)
    (out / "report.html").write_text(render_html(data, summary, list(plots)))
    return report


def render_html(data: dict[str, Any], summary: dict[str, Any], images: list[str]) -> str:
    def row(cells: list[Any], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"

    headline = "".join(row([key, value]) for key, value in summary.items())
    actions = data.get("adversarial_actions", [])
    action_rows = "".join(
        row(
            [
                a["node"],
                a["adversary"],
                a.get("action", ""),
                a.get("block", "")[:16],
                a.get("outcome", ""),
                a.get("sender_scores", ""),
            ]
        )
        for a in actions
    )
    timeline = "".join(row([e["seconds"], e["action"], e["nodes"] or e["groups"]]) for e in data.get("timeline", []))
    nodes = "".join(
        row(
            [
                n["name"],
                "yes" if n["honest"] else "no",
                n["head_height"],
                n["finalized_height"],
                n["finalized_hash"][:16],
                n["test_loss"],
                n["connected_peers"],
                len(n["orphaned_blocks"]),
            ]
        )
        for n in data.get("nodes", [])
    )
    figures = "".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in images)
    failure = data.get("failure")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>potchain simulation: {html.escape(str(data.get("scenario")))}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .5rem;font-size:.9rem}}
img{{max-width:100%}}.bad{{color:#b00}}</style></head><body>
<h1>Scenario {html.escape(str(data.get("scenario")))} (seed {data.get("seed")})</h1>
{f'<p class="bad">The run failed: {html.escape(failure)}</p>' if failure else ""}
<h2>Outcome</h2><table>{headline}</table>
<h2>Plots</h2>{figures}
<h2>Adversarial actions</h2>
<table>{row(["node", "adversary", "action", "block", "what the network did", "sender's scores"], "th")}
{action_rows}</table>
<h2>Faults</h2><table>{row(["seconds", "action", "nodes"], "th")}{timeline}</table>
<h2>Nodes at the end</h2>
<table>{row(["node", "honest", "head", "finalized", "finalized hash", "test loss", "peers", "orphaned"], "th")}
{nodes}</table>
</body></html>
"""
