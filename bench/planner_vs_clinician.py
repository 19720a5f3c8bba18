"""Does the planner beat the clinician whose cases it learned from? The default recipe
(the packaged config `planner`) trained on 1,500 simulated cases with several training seeds, each run
closed loop on held-out simulated cases from a cohort seed never used for training, next to the
simulated anesthesiologist who made the training data and the dual-loop PID; then the same on a
shifted cohort (age 70-90, BMI 30-40, PD 30 % more sensitive). One process per training seed.

    python bench/planner_vs_clinician.py [--quick] [--seeds 0 1 2] [--data-seed 0] [--cases 200] [--jobs 2]
        [--json bench/results/planner_vs_clinician.json] [--figure docs/figures/planner_vs_clinician.png]
    python bench/planner_vs_clinician.py --plot bench/results/planner_vs_clinician.json --figure PNG

Rows: clinician, pid, bc_argmax (the recipe's policy head, argmax: what imitation alone does),
planner (the recipe's default mode) and planner_<mode> for argmax, beam, mcts and mpc. Columns: % of
maintenance in BIS 40-60, % of the case with MAP < 65, BIS nadir in induction, time to BIS < 60,
Varvel's MDPE / MDAPE / wobble against BIS 50, propofol mg/kg/h, remifentanil ug/kg/min; mean and 95 %
bootstrap interval over cases, per training seed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from dosewise.config import load_config
from dosewise.planner.config import PlannerRunConfig, PlannerTrainConfig

METRICS = (
    ("pct_bis_40_60", "BIS 40-60 %", "{:.1f}"),
    ("pct_map_below_65", "MAP<65 %", "{:.1f}"),
    ("bis_nadir", "nadir", "{:.1f}"),
    ("time_to_bis_60_s", "t<60 s", "{:.0f}"),
    ("mdpe", "MDPE", "{:.1f}"),
    ("mdape", "MDAPE", "{:.1f}"),
    ("wobble", "wobble", "{:.1f}"),
    ("propofol_mg_kg_h", "ppf mg/kg/h", "{:.2f}"),
    ("remifentanil_ug_kg_min", "rftn ug/kg/min", "{:.3f}"),
)
MODES = ("argmax", "beam", "mcts", "mpc")
HELD_OUT_SEED = 100_000  # + data seed: the held-out cohorts; training data use the data seed itself


def recipe(config: str, seed: int, quick: bool, overrides: list[str] = ()) -> PlannerRunConfig:
    """The config with the training seed, `--set section.field=value` overrides (YAML values) and,
    for --quick, a short schedule."""
    run = load_config(config, PlannerRunConfig)
    if overrides:
        raw = run.model_dump(mode="json")
        for item in overrides:
            key, _, value = item.partition("=")
            *path, field = key.split(".")
            node = raw
            for part in path:
                node = node[part]
            if field not in node:
                raise SystemExit(f"--set {item}: no field {key!r} in the config")
            node[field] = yaml.safe_load(value)
        run = PlannerRunConfig.model_validate(raw)
    train = run.train.model_dump()
    train["seed"] = seed
    if quick:
        train.update(epochs=2, windows_per_epoch=1280, max_val_windows=512)
    loop = run.closed_loop.model_copy(update={"cases": 0})  # the bench runs its own closed loop
    return run.model_copy(update={"train": PlannerTrainConfig(**train), "closed_loop": loop})


def evaluate_seed(run_dir: str, n_cases: int, data_seed: int, modes: tuple[str, ...] = MODES) -> dict:
    """Every row of the table on the standard and the shifted held-out cohorts (worker process)."""
    from dosewise.evaluate.anesthesia.closed_loop import planner_vs_baselines
    from dosewise.planner.training import load_planner
    from dosewise.sim.anesthesia.cases import SHIFTED_SPEC, CaseSpec

    torch.set_num_threads(1)
    model, run = load_planner(run_dir)
    result = {}
    for cohort_name, spec in (("standard", CaseSpec()), ("shifted", SHIFTED_SPEC)):
        started = time.perf_counter()
        # the clinician (its own draws seeded HELD_OUT_SEED + data seed + 1), the PID and the planner modes
        closed = planner_vs_baselines(model, run, n_cases, HELD_OUT_SEED + data_seed, spec, modes)["policies"]
        rows = {name: {key: finite(closed[name][key]) for key, _, _ in METRICS} for name in closed}
        if "planner_argmax" in rows:
            rows["bc_argmax"] = rows["planner_argmax"]
        if f"planner_{run.closed_loop.default_mode}" in rows:
            rows["planner"] = rows[f"planner_{run.closed_loop.default_mode}"]
        result[cohort_name] = {"policies": rows, "wall_s": time.perf_counter() - started}
    return result


def finite(summary: dict) -> dict:
    """A metric's mean and interval with NaN (no case reached it, e.g. never below BIS 60) as None:
    strict JSON."""
    clean = lambda x: float(x) if x is not None and np.isfinite(x) else None
    return {"mean": clean(summary["mean"]), "ci95": [clean(x) for x in summary["ci95"]]}


def train_and_evaluate(seed: int, run_json: str, data: str, out: str, n_cases: int, data_seed: int, modes: tuple[str, ...]) -> dict:
    from dosewise.evaluate.anesthesia.strategies import train_one

    summary = train_one(f"seed {seed}", run_json, data, out)
    evaluated = evaluate_seed(out, n_cases, data_seed, modes)
    keep = ("epochs", "train_windows", "val_windows", "wall_time_s", "epoch_time_s", "final", "alarms", "search")
    return {"seed": seed, "training": {k: summary.get(k) for k in keep}, **evaluated}


def print_table(title: str, seeds: list[dict]) -> None:
    print(title)
    print(f"{'policy':<16}" + "".join(f"{label:>16}" for _, label, _ in METRICS))
    names = list(seeds[0]["policies"])
    for entry in seeds:
        print(f"  training seed {entry['seed']}")
        for name in names:
            row = entry["policies"][name]
            cells = (fmt.format(row[key]["mean"]) if row[key]["mean"] is not None else "-" for key, _, fmt in METRICS)
            print(f"{name:<16}" + "".join(f"{cell:>16}" for cell in cells))


def plot(result: dict, path: Path) -> None:
    """% time in BIS 40-60 and MAP < 65 of every row, per training seed, both cohorts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = (("standard", result["seeds"]), ("shifted", result["shifted"]["seeds"]))
    names = [n for n in result["seeds"][0]["policies"] if n not in ("bc_argmax", "planner")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharey=True, constrained_layout=True)
    for row, (cohort, seeds) in enumerate(cohorts):
        for col, (key, label) in enumerate(
            (
                ("pct_bis_40_60", "% maintenance in BIS 40-60 (higher is better)"),
                ("pct_map_below_65", "% time MAP < 65 mmHg (lower is better)"),
            )
        ):
            ax = axes[row, col]
            height = 0.8 / len(seeds)
            for i, entry in enumerate(seeds):
                value = lambda x: np.nan if x is None else x
                means = [value(entry["policies"][n][key]["mean"]) for n in names]
                low = [m - value(entry["policies"][n][key]["ci95"][0]) for m, n in zip(means, names)]
                high = [value(entry["policies"][n][key]["ci95"][1]) - m for m, n in zip(means, names)]
                ax.barh(
                    np.arange(len(names)) + i * height, means, height, xerr=[low, high], capsize=2, label=f"training seed {entry['seed']}"
                )
            ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names)
            ax.set_title(f"{cohort} cohort: {label}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            if key == "pct_bis_40_60":
                clinician = np.mean([entry["policies"]["clinician"][key]["mean"] for entry in seeds])
                ax.axvline(clinician, color="gray", ls="--", lw=1)
    axes[0, 0].invert_yaxis()
    fig.suptitle(
        f"planner vs the simulated anesthesiologist, {result['cases']} held-out cases per cohort, mean and 95 % CI; dashed: the clinician"
    )
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=len(result["seeds"]), fontsize=9)
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="planner", help="the recipe: a packaged config name or a YAML path")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the training cohort and of the held-out cases")
    parser.add_argument("--train-cases", type=int, default=None, help="simulated training cases (default 1500; 60 with --quick)")
    parser.add_argument("--cases", type=int, default=200, help="held-out cases per cohort")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="planning modes to run closed loop")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field (an ablation), e.g. --set model.action_encoding=embedding",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, 2 short epochs, 12 cases: a smoke run in minutes")
    parser.add_argument("--out", type=Path, default=Path("runs/planner_vs_clinician"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/planner_vs_clinician.json"))
    parser.add_argument("--figure", type=Path, help="also draw the figure")
    parser.add_argument("--plot", type=Path, help="only draw the figure of an earlier run's JSON")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.figure or args.plot.with_suffix(".png"))
        return
    from dosewise.sim.anesthesia.clinician import simulate_cases

    seeds = args.seeds[:1] if args.quick else args.seeds
    n_cases = 12 if args.quick else args.cases
    train_cases = args.train_cases or (60 if args.quick else 1500)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"train_cases_{train_cases}_seed{args.data_seed}.parquet"
    simulate_cases(train_cases, args.data_seed).to_parquet(data)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [
            pool.submit(
                train_and_evaluate,
                seed,
                recipe(args.config, seed, args.quick, args.overrides).model_dump_json(),
                str(data.resolve()),
                str(args.out / f"seed{seed}"),
                n_cases,
                args.data_seed,
                tuple(args.modes),
            )
            for seed in seeds
        ]
        per_seed = [future.result() for future in futures]
    result = {
        "quick": args.quick,
        "config": args.config,
        "overrides": args.overrides,
        "data_seed": args.data_seed,
        "train_cases": train_cases,
        "cases": n_cases,
        "held_out_seed": HELD_OUT_SEED + args.data_seed,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread per job, {args.jobs} jobs",
        "wall_s": time.perf_counter() - started,
        "seeds": [{"seed": e["seed"], "training": e["training"], "policies": e["standard"]["policies"]} for e in per_seed],
        "shifted": {
            "cohort": "age 70-90, BMI 30-40, C50 of propofol and remifentanil / 1.3",
            "seeds": [{"seed": e["seed"], "policies": e["shifted"]["policies"]} for e in per_seed],
        },
    }
    print_table(f"standard cohort, {n_cases} held-out cases (seed {result['held_out_seed']}): mean over cases", result["seeds"])
    print_table(f"shifted cohort ({result['shifted']['cohort']}): mean over cases", result["shifted"]["seeds"])
    print(f"wall {result['wall_s'] / 60:.1f} min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, allow_nan=False))
    print(f"wrote {args.json}")
    if args.figure:
        plot(result, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
