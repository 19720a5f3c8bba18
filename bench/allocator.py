"""glibc keeping freed memory (`dosewise.allocator`) on and off, for our IQL and d3rlpy's.

    python bench/allocator.py [--repeats 3] [--json OUT]

Each run is a worker of `bench/iql_vs_d3rlpy.py` ([32, 32] / batch 64, 150 simulated patients)
in its own process, started once with glibc's defaults and once with
`dosewise.allocator.ENVIRONMENT`, alternating; steps/s of the whole learner (all members), median
of the repeats. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dosewise.allocator import ENVIRONMENT
from dosewise.sim.vancomycin_clinician import simulate_dataset

WORKER = Path(__file__).parent / "iql_vs_d3rlpy.py"
# name -> worker arguments after the data path: library, hidden, batch, steps[, members, compile]
RUNS = {
    "ours, 64 members, compiled": ["ours", "32,32", "64", "1000", "64", "1"],
    "ours, 64 members, eager": ["ours", "32,32", "64", "1000", "64", "0"],
    "ours, 16 members, compiled": ["ours", "32,32", "64", "1000", "16", "1"],
    "d3rlpy, one run": ["d3rlpy", "32,32", "64", "2000"],
}


def steps_per_s(args: list[str], keep: bool) -> float:
    env = {name: value for name, value in os.environ.items() if name not in ENVIRONMENT}
    if keep:
        env.update(ENVIRONMENT)
    out = subprocess.run([sys.executable, str(WORKER), "--worker", *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "vancomycin.csv")
        simulate_dataset(150, 0).to_csv(data, index=False)
        for name, run in RUNS.items():
            worker_args = [run[0], data, *run[1:]]
            default, kept = [], []
            for _ in range(args.repeats):
                default.append(steps_per_s(worker_args, keep=False))
                kept.append(steps_per_s(worker_args, keep=True))
            d, k = statistics.median(default), statistics.median(kept)
            rows.append({"run": name, "default_steps_per_s": round(d, 1), "kept_steps_per_s": round(k, 1), "ratio": round(k / d, 2)})
    print(f"{'run':<28} {'default':>9} {'kept':>9} {'ratio':>7}   (steps/s, median of {args.repeats})")
    for row in rows:
        print(f"{row['run']:<28} {row['default_steps_per_s']:>9.1f} {row['kept_steps_per_s']:>9.1f} {row['ratio']:>6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeats": args.repeats, "environment": ENVIRONMENT, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
