"""How far off-policy estimates (FQE, PDWIS, WDR) are from the truth on the vancomycin simulator.

For each data seed: simulate 150 patients treated by the simulated clinician, train IQL on them,
then estimate the discounted value (gamma = IQL's, 0.90) of four deterministic policies from the
data alone and compare with the truth, the mean discounted return of the same policy on 2000
fresh simulated patients. Reports each estimator's mean absolute error, how often its 95 %
interval covers the truth, and how well it orders the policies. Prints a table, writes JSON.

    python bench/ope_accuracy.py [--quick] [--seeds 5] [--json OUT] [--bandwidth H]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql
from dosewise.data import load_transitions
from dosewise.evaluate.vancomycin.ope import (
    BehaviourModel,
    OPEConfig,
    evaluate_ope,
    vancomycin_true_value,
)
from dosewise.sim.vancomycin_clinician import ClinicianHabits, simulate_dataset

ESTIMATORS = ("fqe", "wis", "wdr")
TRUTH_PATIENTS, TRUTH_SEED = 2000, 1000


def clinician_rule(obs: np.ndarray, habits: ClinicianHabits = ClinicianHabits()) -> np.ndarray:
    """The simulated clinician's level rule without noise, delay, inertia or per-patient gain.

    Whether an infection is serious is not in the chart, so the band is the midpoint of the two
    bands (12.5-17.5 mg/L); the creatinine alarm needs the first creatinine and is left out.
    """
    low = (habits.target_non_serious[0] + habits.target_serious[0]) / 2
    high = (habits.target_non_serious[1] + habits.target_serious[1]) / 2
    level = obs[:, 0]
    action = np.where(level > high, -(habits.base_change + habits.change_per_mg_l * (level - high)), 0.0)
    action = np.where(level < low, habits.base_change + habits.change_per_mg_l * (low - level), action)
    return np.clip(action, -1.0, 1.0)


def always_raise(obs: np.ndarray) -> np.ndarray:
    """Worse by construction: raise every dose by 30 % every 4 h, whatever the level."""
    return np.full(obs.shape[0], 0.6)


def proportional(obs: np.ndarray) -> np.ndarray:
    """Better than the clinician on this simulator: a proportional controller on the level around 14 mg/L."""
    return np.clip(-0.03 * (obs[:, 0] - 14.0), -1.0, 1.0)


def pairwise_order_accuracy(estimates: list[float], truths: list[float]) -> float:
    """Share of policy pairs the estimator orders as the truth does."""
    pairs = list(itertools.combinations(range(len(truths)), 2))
    agree = [np.sign(estimates[i] - estimates[j]) == np.sign(truths[i] - truths[j]) for i, j in pairs]
    return float(np.mean(agree))


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def one_seed(seed: int, iql_steps: int, config: OPEConfig, workdir: Path) -> dict:
    data = workdir / f"data_{seed}.csv"
    simulate_dataset(150, seed).to_csv(data, index=False)
    run = IQLRunConfig(train=TrainConfig(steps=iql_steps, seed=seed, checkpoint_every=0), data_path=str(data))
    transitions, _ = load_transitions(data, run.data)
    train_iql(run, transitions, workdir / f"run_{seed}", show_progress=False)
    model = TrainedIQL.load(workdir / f"run_{seed}")
    gamma = run.iql.gamma
    policies = {
        "iql_policy": model.policy_action,
        "clinician_rule": clinician_rule,
        "always_raise": always_raise,
        "proportional": proportional,
    }
    behaviour = BehaviourModel.fit(transitions.observations, transitions.actions, config, seed)
    rows = {}
    for name, policy in policies.items():
        started = time.perf_counter()
        ope = evaluate_ope(policy, transitions, gamma, seed, config, behaviour=behaviour)
        truth = vancomycin_true_value(policy, gamma, TRUTH_PATIENTS, TRUTH_SEED)
        rows[name] = {
            "truth": truth,
            **{e: {"mean": ope[e]["mean"], "ci95": ope[e]["ci95"]} for e in ESTIMATORS},
            "ess": ope["ess"]["mean"],
            "overlap": ope["overlap"],
            "seconds": time.perf_counter() - started,
        }
    names = list(policies)
    truths = [rows[p]["truth"]["mean"] for p in names]
    ranking = {
        e: {
            "pairwise": pairwise_order_accuracy([rows[p][e]["mean"] for p in names], truths),
            "spearman": spearman([rows[p][e]["mean"] for p in names], truths),
        }
        for e in ESTIMATORS
    }
    return {
        "seed": seed,
        "gamma": gamma,
        "episodes": ope["episodes"],
        "bandwidth": ope["bandwidth"],
        "behaviour_model": behaviour[1],
        "policies": rows,
        "ranking": ranking,
    }


def summarise(results: list[dict]) -> dict:
    out = {}
    for e in ESTIMATORS:
        errors, covered = [], []
        for r in results:
            for p in r["policies"].values():
                errors.append(abs(p[e]["mean"] - p["truth"]["mean"]))
                covered.append(p[e]["ci95"][0] <= p["truth"]["mean"] <= p[e]["ci95"][1])
        out[e] = {
            "mae": float(np.mean(errors)),
            "coverage": float(np.mean(covered)),
            "pairwise_order": float(np.mean([r["ranking"][e]["pairwise"] for r in results])),
            "spearman": float(np.mean([r["ranking"][e]["spearman"] for r in results])),
        }
    return out


def per_policy(results: list[dict]) -> dict:
    """Mean over seeds of each policy's truth, estimates, absolute errors, ESS and overlap."""
    avg = lambda p, f: float(np.mean([f(r["policies"][p]) for r in results]))
    out = {}
    for p in results[0]["policies"]:
        row = {"truth": avg(p, lambda x: x["truth"]["mean"])}
        for e in ESTIMATORS:
            row[e] = avg(p, lambda x, e=e: x[e]["mean"])
            row[f"{e}_abs_error"] = avg(p, lambda x, e=e: abs(x[e]["mean"] - x["truth"]["mean"]))
        row["ess"] = avg(p, lambda x: x["ess"])
        row["overlap"] = avg(p, lambda x: x["overlap"])
        out[p] = row
    return out


def markdown_tables(summary: dict, policies: dict) -> str:
    lines = [
        "| policy | true value | FQE (abs. error) | PDWIS (abs. error) | WDR (abs. error) | ESS (of 150) | overlap |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in policies.items():
        cells = " | ".join(f"{p[e]:.2f} ({p[e + '_abs_error']:.2f})" for e in ESTIMATORS)
        lines.append(f"| {name} | {p['truth']:.2f} | {cells} | {p['ess']:.1f} | {100 * p['overlap']:.0f} % |")
    lines += ["", "| estimator | mean abs. error | 95 % CI covers truth | pairwise order correct | Spearman |", "|---|---|---|---|---|"]
    for e, s in summary.items():
        lines.append(
            f"| {e.upper() if e != 'wis' else 'PDWIS'} | {s['mae']:.2f} | {100 * s['coverage']:.0f} % | {100 * s['pairwise_order']:.0f} % | {s['spearman']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1000 IQL steps")
    parser.add_argument("--bandwidth", type=float, default=None, help="kernel bandwidth of the target (default: Silverman)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/ope_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, iql_steps = (2, 1000) if args.quick else (args.seeds, 5000)
    config = OPEConfig(bandwidth=args.bandwidth)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for s in range(seeds):
            results.append(one_seed(s, iql_steps, config, Path(tmp)))
            print(f"seed {s} done ({time.perf_counter() - started:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started

    print(f"\n{'seed':>4} | {'policy':<14} | {'truth':>6} | {'FQE':>22} | {'PDWIS':>22} | {'WDR':>22} | {'ESS':>5} | overlap")
    fmt = lambda x: f"{x['mean']:6.2f} [{x['ci95'][0]:6.2f}, {x['ci95'][1]:6.2f}]"
    for r in results:
        for name, p in r["policies"].items():
            print(
                f"{r['seed']:>4} | {name:<14} | {p['truth']['mean']:6.2f} | {fmt(p['fqe'])} | {fmt(p['wis'])} | {fmt(p['wdr'])} | {p['ess']:5.1f} | {100 * p['overlap']:5.0f} %"
            )
    summary = summarise(results)
    policies = per_policy(results)
    print("\nmean over seeds (markdown):\n")
    print(markdown_tables(summary, policies))
    print(f"\n{elapsed:.0f} s in all")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": "python bench/ope_accuracy.py"
                + (" --quick" if args.quick else f" --seeds {seeds}")
                + (f" --bandwidth {args.bandwidth}" if args.bandwidth else ""),
                "patients": 150,
                "iql_steps": iql_steps,
                "truth_patients": TRUTH_PATIENTS,
                "truth_seed": TRUTH_SEED,
                "seconds": elapsed,
                "summary": summary,
                "per_policy": policies,
                "seeds": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
