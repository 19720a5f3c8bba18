"""The simulated anesthesiologist vs the dual-loop PID (after Liu 2011) on the same held-out cases.

    python bench/anesthesia_baselines.py [--cases 200] [--seed 2000] [--json OUT]

Prints a table (mean [95 % CI] over cases) and writes JSON. Liu 2011 (n = 196) reported BIS
40-60 for 82 % +- 12 of the time under dual-loop control vs 71 % +- 19 by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dosewise.evaluate.anesthesia.closed_loop import evaluate_policies
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist
from dosewise.sim.anesthesia.pid import DualLoopPID

COLUMNS = {
    "pct_bis_40_60": "% time BIS 40-60",
    "pct_map_below_65": "% time MAP<65",
    "map_median_maintenance": "median MAP (maintenance)",
    "time_to_bis_60_s": "time to BIS<60 (s)",
    "bis_nadir": "BIS nadir",
    "undershoot": "undershoot",
    "propofol_mg_kg_h": "propofol mg/kg/h",
    "remifentanil_ug_kg_min": "remi ug/kg/min",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=Path("bench/results/anesthesia_baselines.json"))
    args = parser.parse_args()
    result = evaluate_policies(
        {"simulated anesthesiologist": lambda c: SimulatedAnesthesiologist(c, args.seed + 1), "dual-loop PID": DualLoopPID},
        n_cases=args.cases,
        seed=args.seed,
    )
    print(f"{result['cases']} held-out cases, seed {result['seed']}: mean [95 % CI]")
    print("| policy | " + " | ".join(COLUMNS.values()) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, metrics in result["policies"].items():
        cells = [f"{metrics[k]['mean']:.2f} [{metrics[k]['ci95'][0]:.2f}, {metrics[k]['ci95'][1]:.2f}]" for k in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
