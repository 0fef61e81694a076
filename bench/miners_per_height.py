"""Does a network with four miners learn faster per height than the same network with one?

    python bench/miners_per_height.py [--out DIR] [--seeds 21 22] [--finalize 16]

Runs `potchain sim` on sim/scenarios/one-miner.toml and sim/scenarios/four-miners.toml (four
honest validator nodes, real node processes on this machine; one of them mining, or all four),
one after the other, once per seed, and compares the held-out test loss of the chain's model at
each decided height both reached (the simulation's report batches, report.json `details.chain`),
from the first height at which either chain moved. `--finalize` runs each scenario to that
height instead of the file's (`potchain sim --finalize`). Prints JSON: per
seed both curves and the heights where four miners are ahead; over all seeds the heights
compared, the heights four miners are ahead at, and the mean difference (one minus four:
positive when four miners are ahead). The miners share the machine's cores, so four miners
each train slower in wall time; the comparison is per decided height, as the chain counts
progress. A seed sets the miners' keys, and so their training batches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "sim" / "scenarios"


def run_scenario(name: str, out: Path, seed: int, finalize: int | None) -> dict[int, float]:
    """Test loss by decided height of one scenario's run."""
    command = [sys.executable, str(ROOT / "node.py"), "sim", "--scenario", str(SCENARIOS / f"{name}.toml"),
               "--out", str(out), "--seed", str(seed)]  # fmt: skip
    if finalize is not None:
        command += ["--finalize", str(finalize)]
    print(f"[{name}] {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)  # stdout carries this bench's JSON alone
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return {
        block["height"]: block["test_loss"]
        for block in report["details"]["chain"]
        if block.get("test_loss") is not None
    }


def compare(one: dict[int, float], four: dict[int, float]) -> tuple[list[int], list[int]]:
    """(the heights compared: both reached them, from the first at which either chain moved;
    those where four miners' chain has the lower test loss)."""
    heights = sorted(set(one) & set(four))
    if not heights:
        return [], []
    moved = [h for h in heights if one[h] < one[heights[0]] or four[h] < four[heights[0]]]
    compared = heights[heights.index(moved[0]) :] if moved else []
    return compared, [h for h in compared if four[h] < one[h]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where the runs' data and reports go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[21])
    parser.add_argument("--finalize", type=int, default=None, help="run each scenario to this height")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="miners-per-height-"))
    runs, differences, ahead_at, compared_at = [], [], 0, 0
    for seed in args.seeds:
        one = run_scenario("one-miner", out / f"seed-{seed}" / "one-miner", seed, args.finalize)
        four = run_scenario("four-miners", out / f"seed-{seed}" / "four-miners", seed, args.finalize)
        compared, ahead = compare(one, four)
        differences += [one[h] - four[h] for h in compared]
        ahead_at, compared_at = ahead_at + len(ahead), compared_at + len(compared)
        runs.append({
            "seed": seed,
            "heights_compared": len(compared),
            "four_miners_ahead_at": len(ahead),
            "mean_test_loss_difference": round(sum(one[h] - four[h] for h in compared) / len(compared), 4)
            if compared
            else None,
            "one_miner_test_loss": {h: one[h] for h in sorted(one)},
            "four_miners_test_loss": {h: four[h] for h in sorted(four)},
        })  # fmt: skip
        print(f"[seed {seed}] four miners ahead at {len(ahead)} of {len(compared)} heights", file=sys.stderr)
    print(json.dumps({
        "seeds": args.seeds,
        "finalize": args.finalize,
        "out": str(out),
        "heights_compared": compared_at,
        "four_miners_ahead_at": ahead_at,
        "four_miners_ahead_at_every_height": compared_at > 0 and ahead_at == compared_at,
        "mean_test_loss_difference": round(sum(differences) / len(differences), 4) if differences else None,
        "runs": runs,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
