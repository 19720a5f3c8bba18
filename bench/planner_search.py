"""Closed loop of the planner with and without search: BC only vs BC + MCTS targets under
each preset (conservative, balanced, aggressive), and planning at inference (argmax, RL-DITR beam
search, MCTS) — all on the same held-out simulated patients next to the simulated anesthesiologist.

Every model trains on the same data, split, model size, seed and budget (the packaged planner_warmup config
with a shorter schedule: 12 epochs of 6,400 windows, env-only warm-up 4), in parallel processes of
one thread each. Prints a table and writes JSON.

    dosewise simulate anesthesia --out cases.parquet
    python bench/planner_search.py --data cases.parquet [--quick] [--jobs 2] [--json OUT] [--figure PNG]
    python bench/planner_search.py --plot bench/results/planner_search.json --figure docs/figures/planner_search.png

Training seeds (initialisation and minibatch order; the case split, the held-out patients and
the clinician stay the same) one run each, then the spread across seeds of every policy's mean,
with every seed's run inside (the current bench/results/planner_search.json):

    python bench/planner_search.py --data cases.parquet --seed 1 --json runs/planner_search_seed1.json
    python bench/planner_search.py --across runs/planner_search_seed0.json runs/planner_search_seed1.json ...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from dosewise.config import load_config
from dosewise.evaluate.anesthesia.closed_loop import evaluate_policies
from dosewise.evaluate.anesthesia.strategies import train_one
from dosewise.planner.beam_search import BeamConfig
from dosewise.planner.config import (
    ClosedLoopConfig,
    PlannerRunConfig,
    PlannerTrainConfig,
    SearchTrainingConfig,
    StrategyConfig,
)
from dosewise.planner.mcts import MCTSConfig
from dosewise.planner.policy import PlannerPolicy
from dosewise.planner.training import load_planner
from dosewise.sim.anesthesia.cases import CaseSpec
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist

PRESETS = ("off", "conservative", "balanced", "aggressive")
# The balanced preset with its margin calibrated to this activation (search.target_activation).
CALIBRATED_ACTIVATION = 0.25
OUTCOMES = (
    ("pct_bis_40_60", "BIS 40-60 %"),
    ("pct_map_below_65", "MAP<65 %"),
    ("bis_nadir", "BIS nadir"),
    ("propofol_mg_kg_h", "propofol mg/kg/h"),
)


def runs(
    quick: bool, seed: int = 0, presets: tuple[str, ...] = (*PRESETS[1:], "calibrated"), calibrate: str = "every_epoch"
) -> dict[str, PlannerRunConfig]:
    """BC alone ("bc") and Stage 2 with the search under each of `presets` (a preset name, or
    "calibrated": balanced with the margin calibrated to CALIBRATED_ACTIVATION), same budget."""
    base = load_config("planner_warmup", PlannerRunConfig)
    train = PlannerTrainConfig(
        **{
            **base.train.model_dump(),
            "epochs": 2 if quick else 12,
            "windows_per_epoch": 640 if quick else 6400,
            "max_val_windows": 512 if quick else 4000,
            "seed": seed,
        }
    )
    strategy = StrategyConfig(**{**base.strategy.model_dump(), "warmup_epochs": 1 if quick else 4})
    common = {"train": train, "strategy": strategy, "closed_loop": ClosedLoopConfig(cases=0)}
    searches = {"bc": SearchTrainingConfig()}
    for preset in presets:
        calibrated = preset == "calibrated"
        searches[preset] = SearchTrainingConfig(
            preset="balanced" if calibrated else preset,
            target_activation=CALIBRATED_ACTIVATION if calibrated else None,
            calibrate=calibrate,
        )
    return {name: base.model_copy(update={**common, "search": search}) for name, search in searches.items()}


def plot(result: dict, path: Path) -> None:
    """Time in BIS 40-60 and under MAP 65 per policy, with the 95 % intervals over patients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [row["policy"].replace("simulated_anesthesiologist", "simulated clinician").replace("_", " ") for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, constrained_layout=True)
    for ax, (key, label) in zip(axes, OUTCOMES[:2]):
        means = [row[key]["mean"] for row in rows]
        errors = [[m - row[key]["ci95"][0] for m, row in zip(means, rows)], [row[key]["ci95"][1] - m for m, row in zip(means, rows)]]
        colors = ["tab:gray" if "simulated" in n else "tab:blue" if n.startswith("bc ") else "tab:orange" for n in names]
        ax.barh(names, means, xerr=errors, color=colors, capsize=3)
        ax.set_xlabel(f"{label} (mean over {result['cases']} held-out cases, 95 % CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # shared y axis: once, the table's order top to bottom
    axes[0].set_title("BIS in 40-60 during maintenance (higher is better)")
    axes[1].set_title("time with MAP < 65 mmHg (lower is better)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def across_seeds(paths: list[Path]) -> dict:
    """Every policy's mean over the held-out cases, per training seed, and their mean and range
    across seeds (one JSON per seed, from runs that differ only in --seed); "per_seed" holds the
    runs themselves."""
    results = [json.loads(path.read_text()) for path in paths]
    seeds = [r.get("seed", 0) for r in results]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--across needs runs of different seeds, got seeds {seeds} from {[str(p) for p in paths]}")
    for key in ("cases", "quick", "data"):
        values = [r.get(key) for r in results]
        if len(set(map(str, values))) > 1:
            raise SystemExit(
                f"--across needs runs that differ only in --seed; their {key!r} differ: "
                + ", ".join(f"{path}: {value}" for path, value in zip(paths, values))
            )
    policies = [row["policy"] for row in results[0]["rows"]]
    table = []
    for policy in policies:
        rows = [next(row for row in r["rows"] if row["policy"] == policy) for r in results]
        entry = {"policy": policy}
        for key, _ in OUTCOMES:
            means = [row[key]["mean"] for row in rows]
            entry[key] = {"mean": sum(means) / len(means), "min": min(means), "max": max(means), "per_seed": means}
        rates = [row["activation_rate_last_epoch"] for row in rows]
        entry["activation_rate_last_epoch"] = None if rates[0] is None else rates
        table.append(entry)
    return {"seeds": seeds, "runs": [str(p) for p in paths], "cases": results[0]["cases"], "rows": table, "per_seed": results}


def print_across(summary: dict) -> None:
    print(
        f"closed loop on {summary['cases']} held-out simulated cases, training seeds {summary['seeds']}: "
        "mean over seeds of each seed's mean [lowest, highest seed]"
    )
    print(f"{'policy':<28}" + "".join(f"{label:>24}" for _, label in OUTCOMES) + f"{'MCTS activation':>20}")
    for row in summary["rows"]:
        cells = "".join(f"{row[k]['mean']:>9.1f} [{row[k]['min']:5.1f}, {row[k]['max']:5.1f}]" for k, _ in OUTCOMES)
        rates = row["activation_rate_last_epoch"]
        print(f"{row['policy']:<28}{cells}{'' if rates is None else '  ' + ' / '.join(f'{100 * r:.0f}%' for r in rates):>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="only draw the figure of an earlier run's JSON (of its first seed, across seeds)")
    parser.add_argument("--figure", type=Path, help="also write a PNG of the closed-loop table")
    parser.add_argument("--data", type=Path, help="cases from `dosewise simulate anesthesia`")
    parser.add_argument("--out", type=Path, default=Path("runs/planner_search"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/planner_search.json"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cases", type=int, default=50, help="held-out simulated cases")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 6 cases: a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialisation, minibatch order)")
    parser.add_argument("--across", type=Path, nargs="+", help="only summarise earlier runs' JSONs across seeds")
    parser.add_argument(
        "--presets",
        nargs="+",
        choices=(*PRESETS[1:], "calibrated"),
        default=[*PRESETS[1:], "calibrated"],
        help="Stage 2 search presets trained beside BC alone",
    )
    parser.add_argument(
        "--calibrate", choices=("every_epoch", "once"), default="every_epoch", help="when the calibrated preset sets its margin"
    )
    args = parser.parse_args()
    if args.across:
        summary = across_seeds(args.across)
        print_across(summary)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
        return
    if args.plot:
        result = json.loads(args.plot.read_text())
        plot(result.get("per_seed", [result])[0], args.figure or args.plot.with_suffix(".png"))  # across seeds: the first seed's run
        return
    if args.data is None:
        parser.error("--data is required (or --plot JSON)")
    torch.set_num_threads(1)
    cases = 6 if args.quick else args.cases
    started = time.perf_counter()

    configs = runs(args.quick, args.seed, tuple(args.presets), args.calibrate)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {
            name: pool.submit(train_one, name, run.model_dump_json(), str(args.data.resolve()), str(args.out / name))
            for name, run in configs.items()
        }
        summaries = {name: future.result() for name, future in futures.items()}
    train_s = time.perf_counter() - started
    models = {name: load_planner(args.out / name)[0] for name in configs}
    pre_len = models["bc"].pre_len

    spec = CaseSpec()
    mcts = MCTSConfig(num_simulations=50, gamma=configs["bc"].windows.gamma, max_depth=pre_len)
    beam = BeamConfig(beam_width=4, top_k=4, depth=3, gamma=configs["bc"].windows.gamma)
    policies = {
        "bc_argmax": lambda cohort: PlannerPolicy(models["bc"], "argmax"),
        "bc_beam": lambda cohort: PlannerPolicy(models["bc"], "beam", beam=beam),
        "bc_mcts": lambda cohort: PlannerPolicy(models["bc"], "mcts", mcts=mcts),
        **{f"{p}_argmax": (lambda cohort, p=p: PlannerPolicy(models[p], "argmax")) for p in configs if p != "bc"},
        "simulated_anesthesiologist": lambda cohort: SimulatedAnesthesiologist(cohort, 2001, step_s=spec.step_s),
    }
    loop_started = time.perf_counter()
    closed = evaluate_policies(policies, n_cases=cases, seed=2000, spec=spec)
    loop_s = time.perf_counter() - loop_started

    table = []
    for name, outcome in closed["policies"].items():
        trained = name.rsplit("_", 1)[0] if name != "simulated_anesthesiologist" else None
        search = summaries[trained]["search"] if trained in summaries else {}
        activation = search.get("activation") or []
        table.append(
            {
                "policy": name,
                **{key: outcome[key] for key, _ in OUTCOMES},
                "activation_rate_last_epoch": activation[-1]["rate"] if activation else None,
                "activation_by_epoch": [entry["rate"] for entry in activation] or None,
                "margin": search.get("margin_used"),
                "activation_alarms": len(search.get("activation_alarms", [])),
                "epoch_time_s": summaries[trained]["epoch_time_s"] if trained in summaries else None,
            }
        )
    result = {
        "quick": args.quick,
        "seed": args.seed,
        "data": str(args.data),
        "cases": cases,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread per job, {args.jobs} jobs",
        "train_wall_s": train_s,
        "closed_loop_wall_s": loop_s,
        "mcts": mcts.model_dump(),
        "beam": beam.model_dump(),
        "rows": table,
        "summaries": {name: {k: v for k, v in s.items() if k != "history"} for name, s in summaries.items()},
    }
    header = f"{'policy':<28}" + "".join(f"{label:>24}" for _, label in OUTCOMES) + f"{'MCTS activation':>17}"
    print(f"closed loop on {cases} held-out simulated cases (seed 2000), training seed {args.seed}: mean [95 % CI]")
    print(header)
    for row in table:
        cells = "".join(f"{row[key]['mean']:>9.1f} [{row[key]['ci95'][0]:5.1f}, {row[key]['ci95'][1]:5.1f}]" for key, _ in OUTCOMES)
        rate = row["activation_rate_last_epoch"]
        print(f"{row['policy']:<28}{cells}{'' if rate is None else f'{100 * rate:>16.1f}%'}")
    print(f"training {train_s / 60:.1f} min, closed loop {loop_s / 60:.1f} min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if args.figure:
        plot(result, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
