"""How far each off-policy estimate of a vancomycin policy is from the truth, and whether it says when it does not know.

For each data size (150 patients, the seed data's size, and 1,000) and data seed: simulate the courses the
noisy clinician gave, train IQL on them, then estimate the discounted value (gamma = IQL's, 0.90) of six
policies from the data alone, with every estimator of `dosewise.evaluate.vancomycin.off_policy`. The truth is
the mean discounted return of the same policy on 10,000 fresh simulated patients (the same patients and random
draws for every policy). Reports, per estimator: how often its 95 % interval covers the truth (estimable
cases), how often it orders two policies as the truth does (pairs whose truths' 95 % intervals do not
overlap), its mean absolute error, the share of cases it declares not estimable, and how often it ranks
``always_raise`` above the clinicians who made the data. Prints tables, writes JSON.

    python bench/ope_accuracy.py [--quick] [--seeds 5] [--sizes 150 1000] [--json OUT]
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

from dosewise.algos.bayesian_policy import BayesianDosingPolicy
from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql
from dosewise.data import load_table
from dosewise.data.transitions import build_transitions
from dosewise.evaluate.stats import bootstrap_ci, bootstrap_indices
from dosewise.evaluate.vancomycin.off_policy import DEFAULT_ESTIMATOR, ESTIMATOR_LABELS, OffPolicyEvaluator
from dosewise.evaluate.vancomycin.ope import vancomycin_true_value
from dosewise.evaluate.vancomycin.twins import TwinConfig
from dosewise.sim.vancomycin_clinician import ClinicianHabits, simulate_dataset

ESTIMATORS = tuple(ESTIMATOR_LABELS)
POLICIES = ("iql_policy", "clinician_rule", "bayesian", "proportional", "always_raise", "behaviour_perturbed")
TRUTH_PATIENTS, TRUTH_SEED = 10_000, 1000
PERTURBATION = {"shift": 0.2, "extra_sd": 0.1}  # the clinicians, 10 % more generous per decision and noisier


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
    """A proportional controller on the level around 14 mg/L."""
    return np.clip(-0.03 * (obs[:, 0] - 14.0), -1.0, 1.0)


def behaviour_truth(gamma: float) -> dict:
    """The noisy clinician's own value on the truth's patient count (fresh courses of the same simulator)."""
    frame = simulate_dataset(TRUTH_PATIENTS, TRUTH_SEED)
    t = frame.groupby("patient_id", sort=False).cumcount().to_numpy()
    returns = (frame["reward"].to_numpy() * gamma**t).reshape(-1)
    per_patient = np.bincount(frame["patient_id"].factorize()[0], weights=returns)
    return bootstrap_ci(lambda i: per_patient[i].mean(-1), bootstrap_indices(len(per_patient), 1000, TRUTH_SEED), per_patient.mean())


def one_case(size: int, seed: int, iql_steps: int, draws: int, workdir: Path, truths: dict) -> dict:
    started = time.perf_counter()
    data = workdir / f"data_{size}_{seed}.csv"
    simulate_dataset(size, seed).to_csv(data, index=False)
    run = IQLRunConfig(train=TrainConfig(steps=iql_steps, seed=seed, checkpoint_every=0), data_path=str(data))
    frame, _ = load_table(data, run.data)
    transitions = build_transitions(frame, run.data)
    train_iql(run, transitions, workdir / f"run_{size}_{seed}", show_progress=False)
    model = TrainedIQL.load(workdir / f"run_{size}_{seed}")
    gamma = run.iql.gamma
    evaluator = OffPolicyEvaluator(
        frame, transitions, gamma, model.data_config, seed, twin_config=TwinConfig(draws=draws), source=str(data)
    )
    perturbed = evaluator.behaviour[0].perturbed(PERTURBATION["shift"], PERTURBATION["extra_sd"], seed)
    perturbed.feature_names = model.feature_names
    policies = {
        "iql_policy": (model.policy_action, model.feature_names),
        "clinician_rule": (clinician_rule, None),
        "bayesian": (BayesianDosingPolicy(), None),
        "proportional": (proportional, None),
        "always_raise": (always_raise, None),
        "behaviour_perturbed": (perturbed, model.feature_names),
    }
    rows = {}
    for name, (policy, features) in policies.items():
        shared = name not in ("iql_policy", "behaviour_perturbed")  # the others do not depend on the data
        truth = truths.get(name) if shared else None
        if truth is None:
            truth = vancomycin_true_value(policy, gamma, TRUTH_PATIENTS, TRUTH_SEED, features=features)
            if shared:
                truths[name] = truth
        rows[name] = {"truth": truth, **evaluator.evaluate(policy, features)["estimators"]}
    return {
        "size": size,
        "seed": seed,
        "gamma": gamma,
        "episodes": len(transitions.episode_slices()),
        "behaviour": evaluator.behaviour_value,
        "model_check": evaluator.twins.model_check if evaluator.twins else None,
        "policies": rows,
        "seconds": time.perf_counter() - started,
    }


def _estimable(entry: dict) -> bool:
    return entry.get("not_estimable") is None and entry.get("estimate") is not None


def summarise(cases: list[dict], sizes: list[int]) -> dict:
    """The bench's verdict per estimator (the JSON's "estimators")."""
    out = {}
    for e in ESTIMATORS:
        coverage, pairwise, mae, counts, flagged, raise_above = {}, {}, {}, {}, 0, 0
        total = 0
        for size in sizes:
            covered, errors, agree = [], [], []
            for case in (c for c in cases if c["size"] == size):
                estimable = {p: r for p, r in case["policies"].items() if _estimable(r[e])}
                total += len(case["policies"])
                flagged += len(case["policies"]) - len(estimable)
                for r in estimable.values():
                    lo, hi = r[e]["ci95"]
                    covered.append(lo <= r["truth"]["mean"] <= hi)
                    errors.append(abs(r[e]["estimate"] - r["truth"]["mean"]))
                for a, b in itertools.combinations(estimable, 2):
                    ta, tb = estimable[a]["truth"], estimable[b]["truth"]
                    if ta["ci95"][1] < tb["ci95"][0] or tb["ci95"][1] < ta["ci95"][0]:  # truths clearly apart
                        agree.append(np.sign(estimable[a][e]["estimate"] - estimable[b][e]["estimate"]) == np.sign(ta["mean"] - tb["mean"]))
                ar = case["policies"]["always_raise"][e]
                raise_above += int(_estimable(ar) and ar["estimate"] > case["behaviour"]["mean"])
            key = str(size)
            coverage[key] = float(np.mean(covered)) if covered else None
            mae[key] = float(np.mean(errors)) if errors else None
            pairwise[key] = float(np.mean(agree)) if agree else None
            counts[key] = {"estimable": len(errors), "pairs": len(agree)}
        out[e] = {
            "coverage": coverage,
            "pairwise_order": pairwise,
            "mae": mae,
            "not_estimable": flagged / total if total else None,
            "always_raise_above_clinician": raise_above,
            "counts": counts,
        }
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown(summary: dict, sizes: list[int], cases: list[dict]) -> str:
    lines = [
        "| estimator | "
        + " | ".join(f"coverage {s}" for s in sizes)
        + " | "
        + " | ".join(f"order {s}" for s in sizes)
        + " | "
        + " | ".join(f"MAE {s}" for s in sizes)
        + " | not estimable | always_raise above clinician |",
        "|---" * (2 + 3 * len(sizes)) + "|---|",
    ]
    for e, s in summary.items():
        lines.append(
            f"| {ESTIMATOR_LABELS[e]}{' (default)' if e == DEFAULT_ESTIMATOR else ''} | "
            + " | ".join(_pct(s["coverage"][str(z)]) for z in sizes)
            + " | "
            + " | ".join(_pct(s["pairwise_order"][str(z)]) for z in sizes)
            + " | "
            + " | ".join(_num(s["mae"][str(z)]) for z in sizes)
            + f" | {_pct(s['not_estimable'])} | {s['always_raise_above_clinician']} of {len(cases)} |"
        )
    lines += [
        "",
        "| size | policy | truth | " + " | ".join(ESTIMATOR_LABELS[e] for e in ESTIMATORS) + " |",
        "|---" * (3 + len(ESTIMATORS)) + "|",
    ]
    for size in sizes:
        group = [c for c in cases if c["size"] == size]
        for p in POLICIES:
            truth = np.mean([c["policies"][p]["truth"]["mean"] for c in group])
            cells = []
            for e in ESTIMATORS:
                values = [c["policies"][p][e]["estimate"] for c in group if _estimable(c["policies"][p][e])]
                flagged = len(group) - len(values)
                cells.append((f"{np.mean(values):.2f}" if values else "—") + (f" ({flagged} n.e.)" if flagged else ""))
            lines.append(f"| {size} | {p} | {truth:.2f} | " + " | ".join(cells) + " |")
        behaviour = np.mean([c["behaviour"]["mean"] for c in group])
        lines.append(
            f"| {size} | clinicians (logged) | — | {behaviour:.2f} (on-policy mean of the logged courses) |" + " |" * (len(ESTIMATORS) - 1)
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 1000])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1000 IQL steps, 4 posterior draws")
    parser.add_argument("--json", type=Path, default=Path("bench/results/ope_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, iql_steps, draws = (2, 1000, 4) if args.quick else (args.seeds, 5000, None)
    started = time.perf_counter()
    truths: dict = {}
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for seed in range(seeds):
                k = draws or (10 if size <= 300 else 4)  # posterior draws per patient: ~1,500-4,000 twins
                cases.append(one_case(size, seed, iql_steps, k, Path(tmp), truths))
                print(f"{size} patients, seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)
    behaviour = behaviour_truth(cases[0]["gamma"])
    elapsed = time.perf_counter() - started

    fmt = lambda r: "not estimable" if not _estimable(r) else f"{r['estimate']:6.2f} [{r['ci95'][0]:6.2f}, {r['ci95'][1]:6.2f}]"
    print(f"\n{'size':>4} | {'seed':>4} | {'policy':<19} | {'truth':>6} | " + " | ".join(f"{e:>22}" for e in ESTIMATORS))
    for c in cases:
        for name, r in c["policies"].items():
            print(
                f"{c['size']:>4} | {c['seed']:>4} | {name:<19} | {r['truth']['mean']:6.2f} | "
                + " | ".join(f"{fmt(r[e]):>22}" for e in ESTIMATORS)
            )
        print(
            f"{c['size']:>4} | {c['seed']:>4} | {'clinicians (logged)':<19} | {behaviour['mean']:6.2f} | {c['behaviour']['mean']:6.2f} on-policy"
        )
    summary = summarise(cases, args.sizes)
    print("\n" + markdown(summary, args.sizes, cases))
    print(
        f"\nclinicians' true value {behaviour['mean']:.2f} [{behaviour['ci95'][0]:.2f}, {behaviour['ci95'][1]:.2f}]; {elapsed:.0f} s in all"
    )
    command = (
        "python bench/ope_accuracy.py" + (" --quick" if args.quick else f" --seeds {seeds}") + " --sizes " + " ".join(map(str, args.sizes))
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "default_estimator": DEFAULT_ESTIMATOR,
        "estimators": summary,
        "truth_patients": TRUTH_PATIENTS,
        "truth_seed": TRUTH_SEED,
        "clinicians_true_value": behaviour,
        "perturbation": PERTURBATION,
        "iql_steps": iql_steps,
        "seconds": elapsed,
        "cases": cases,
    }
    args.json.write_text(json.dumps(payload, indent=1, allow_nan=False))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
