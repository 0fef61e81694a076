"""Does a network with four miners learn faster per height than the same network with one?

    python bench/miners_per_height.py [--out DIR] [--seed 21]

Runs `potchain sim` on sim/scenarios/one-miner.toml and sim/scenarios/four-miners.toml (four
honest validator nodes, real node processes on this machine; one of them mining, or all four),
one after the other, and compares the held-out test loss of the chain's model at each decided
height both reached (the simulation's report batches, report.json `details.chain`). Prints
JSON: both curves, the heights where four miners are ahead, and the mean difference over the
heights after the first update. The miners share the machine's cores, so four miners each
train slower in wall time; the comparison is per decided height, as the chain counts progress.
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


def run_scenario(name: str, out: Path, seed: int) -> dict[int, float]:
    """Test loss by decided height of one scenario's run."""
    command = [sys.executable, str(ROOT / "node.py"), "sim", "--scenario", str(SCENARIOS / f"{name}.toml"),
               "--out", str(out), "--seed", str(seed)]  # fmt: skip
    print(f"[{name}] {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return {
        block["height"]: block["test_loss"]
        for block in report["details"]["chain"]
        if block.get("test_loss") is not None
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where the runs' data and reports go")
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="miners-per-height-"))
    one = run_scenario("one-miner", out / "one-miner", args.seed)
    four = run_scenario("four-miners", out / "four-miners", args.seed)
    heights = sorted(set(one) & set(four))
    moved = [h for h in heights if one[h] < one[heights[0]] or four[h] < four[heights[0]]]
    compared = heights[heights.index(moved[0]) :] if moved else []
    ahead = [h for h in compared if four[h] < one[h]]
    print(json.dumps({
        "seed": args.seed,
        "out": str(out),
        "heights_compared": len(compared),
        "four_miners_ahead_at": len(ahead),
        "four_miners_ahead_at_every_height": bool(compared) and len(ahead) == len(compared),
        "mean_test_loss_difference": round(sum(one[h] - four[h] for h in compared) / len(compared), 4)
        if compared
        else None,
        "one_miner_test_loss": {h: one[h] for h in heights},
        "four_miners_test_loss": {h: four[h] for h in heights},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
