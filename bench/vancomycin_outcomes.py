"""Closed-loop outcome of IQL vs the simulated clinician and MAP-Bayesian dosing over several data/training seeds.

Each seed simulates its own 150-patient training set, trains IQL with the conservative defaults,
and runs the learned policy (policy mean), the greedy Q action, the clinician and MAP-Bayesian
dosing (through the learned policy's action space, and setting the regimen freely) on the same
1000 held-out patients with the same random draws. Prints a table and writes JSON.

    python bench/vancomycin_outcomes.py [--seeds 5] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql
from dosewise.data.loading import load_table
from dosewise.data.transitions import build_transitions
from dosewise.evaluate.vancomycin.closed_loop import bayesian_baselines, evaluate_vancomycin
from dosewise.sim.vancomycin_clinician import simulate_dataset

METRICS = ("auc_in_target_frac", "aki_rate", "mean_return")
SIDES = ("learned_policy", "greedy_q", "clinician", "bayesian", "bayesian_free")


def one_seed(seed: int, patients: int, steps: int, eval_patients: int, workdir: Path) -> dict:
    data = workdir / f"data_{seed}.csv"
    simulate_dataset(patients, seed).to_csv(data, index=False)
    run = IQLRunConfig(train=TrainConfig(steps=steps, seed=seed, checkpoint_every=0), data_path=str(data))
    frame, _ = load_table(data, run.data)
    train_iql(run, build_transitions(frame, run.data), workdir / f"run_{seed}", show_progress=False)
    model = TrainedIQL.load(workdir / f"run_{seed}")
    eval_seed = 1000 + seed
    policy = evaluate_vancomycin(model.policy_action, eval_patients, eval_seed, baselines=bayesian_baselines())
    greedy = evaluate_vancomycin(model.greedy_action, eval_patients, eval_seed)
    row = {
        "seed": seed,
        "learned_policy": {m: policy["learned"][m]["mean"] for m in METRICS},
        "greedy_q": {m: greedy["learned"][m]["mean"] for m in METRICS},
        "clinician": {m: policy["clinician"][m]["mean"] for m in METRICS},
        "difference_ci95": {m: policy["difference"][m]["ci95"] for m in METRICS},
    }
    for name in ("bayesian", "bayesian_free"):
        row[name] = {m: policy[name]["outcomes"][m]["mean"] for m in METRICS}
        row[f"{name}_vs_clinician_ci95"] = {m: policy[name]["difference"][m]["ci95"] for m in METRICS}
        # paired: Bayesian - learned policy on the same patients
        row[f"{name}_vs_learned"] = {m: policy[name]["difference_vs_learned"][m] for m in METRICS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1000 steps, 300 held-out patients")
    parser.add_argument("--json", type=Path, default=Path("bench/results/vancomycin_outcomes.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, steps, eval_patients = (2, 1000, 300) if args.quick else (args.seeds, 5000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_seed(s, 150, steps, eval_patients, Path(tmp)) for s in range(seeds)]
    header = f"{'seed':>4} | {'side':<14} | {'AUC in target':>13} | {'AKI':>6} | {'return':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for side in SIDES:
            r = row[side]
            print(
                f"{row['seed']:>4} | {side:<14} | {100 * r['auc_in_target_frac']:>12.1f}% | {100 * r['aki_rate']:>5.1f}% | {r['mean_return']:>7.2f}"
            )
    summary = {
        side: {m: [float(np.mean([r[side][m] for r in rows])), float(np.std([r[side][m] for r in rows]))] for m in METRICS}
        for side in SIDES
    }
    for side, values in summary.items():
        print(f"mean±sd {side:<14} | " + " | ".join(f"{m} {v[0]:.3f}±{v[1]:.3f}" for m, v in values.items()))
    for row in rows:
        for name in ("bayesian", "bayesian_free"):
            d = row[f"{name}_vs_learned"]
            print(
                f"seed {row['seed']} {name} - learned_policy: "
                + " | ".join(f"{m} {d[m]['mean']:+.3f} [{d[m]['ci95'][0]:+.3f}, {d[m]['ci95'][1]:+.3f}]" for m in METRICS)
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"patients": 150, "steps": steps, "eval_patients": eval_patients, "seeds": rows, "summary": summary}, indent=2, allow_nan=False
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
