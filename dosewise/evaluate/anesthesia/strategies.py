"""`dosewise compare-strategies`: the five training strategies on the same data and
seed, side by side — environment-model metrics, action error, rebound alarms and closed-loop
outcomes — as a table (JSON, Markdown) and a figure of the env metrics per epoch.

The hypothesis under test: joint training lets the policy loss degrade the environment
model; warm-up and detach protect it. Runs go in parallel processes (one CPU thread each).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from dosewise.checkpoint import write_figure_atomic, write_json_atomic, write_text_atomic
from dosewise.config import ConfigError, load_config
from dosewise.planner.config import STRATEGIES, PlannerRunConfig, PlannerTrainConfig

# Per-epoch metrics drawn in the figure, with their axis labels.
FIGURE_METRICS: tuple[tuple[str, str], ...] = (
    ("val_bis_mae", "BIS MAE (points)"),
    ("val_map_mae", "MAP MAE (mmHg)"),
    ("val_reward_mae", "reward MAE"),
    ("val_value_mae", "value MAE"),
    ("val_action_mae_ppf", "propofol action MAE (mL/h)"),
    ("val_action_mae_rftn", "remifentanil action MAE (mL/h)"),
)


def strategy_configs(config_dir: str | Path | None = None, strategies: tuple[str, ...] = STRATEGIES) -> dict[str, PlannerRunConfig]:
    """`planner_<strategy>` of each strategy (the packaged configs, or the YAML files in
    `config_dir`), checked to name that strategy and to share the data split, model and training
    seed (else the comparison is not fair)."""
    runs, sources = {}, {}
    for name in strategies:
        source = f"planner_{name}" if config_dir is None else Path(config_dir) / f"planner_{name}.yaml"
        if config_dir is not None and not Path(source).is_file():
            raise ConfigError(f"{source}: no such config; compare-strategies reads planner_<strategy>.yaml for {', '.join(strategies)}")
        run = load_config(source, PlannerRunConfig)
        if run.strategy.name != name:
            raise ConfigError(f"{source}: strategy.name is {run.strategy.name!r}, expected {name!r}")
        runs[name], sources[name] = run, source
    first_name, first = next(iter(runs.items()))
    for name, run in runs.items():
        for part in ("windows", "model", "train", "data"):
            if getattr(run, part) != getattr(first, part):
                raise ConfigError(
                    f"{sources[name]}: section {part!r} differs from planner_{first_name}; "
                    "the strategies must share data, split, model and training settings to be comparable"
                )
    return runs


def train_one(name: str, run_json: str, data: str, out: str) -> dict[str, Any]:
    """One training run in a worker process, one thread; returns its summary (JSON-able)."""
    import torch

    from dosewise.evaluate.anesthesia.closed_loop import evaluate_planner_run
    from dosewise.planner.run import train_from_file

    torch.set_num_threads(1)
    run = PlannerRunConfig.model_validate_json(run_json)
    started = time.perf_counter()

    def echo(line: str) -> None:
        print(f"[{name}] {line}", flush=True)

    summary = evaluate_planner_run(train_from_file(run, data, out, echo=echo), run, out, echo)
    return {**summary, "total_time_s": time.perf_counter() - started}


def compare_strategies(
    data: str | Path,
    out: str | Path,
    config_dir: str | Path | None = None,
    epochs: int | None = None,
    jobs: int = 2,
    strategies: tuple[str, ...] = STRATEGIES,
    echo: Callable[[str], Any] = print,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train every strategy on `data` (same split, model and seed), then write into `out`:
    <strategy>/ run directories, comparison.json, comparison.md and env_metrics.png. The configs
    are the packaged planner_<strategy>, or those of `config_dir`.
    `epochs` and `seed` override train.epochs and train.seed of every strategy."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = strategy_configs(config_dir, strategies)
    overrides = {key: value for key, value in (("epochs", epochs), ("seed", seed)) if value is not None}
    if overrides:
        runs = {
            name: run.model_copy(update={"train": PlannerTrainConfig(**{**run.train.model_dump(), **overrides})})
            for name, run in runs.items()
        }
    started = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(runs))), mp_context=context) as pool:
        futures = {
            pool.submit(train_one, name, run.model_dump_json(), str(Path(data).resolve()), str(out / name)): name
            for name, run in runs.items()
        }
        for future in as_completed(futures):
            name = futures[future]
            summaries[name] = future.result()
            echo(f"{name}: done in {summaries[name]['total_time_s'] / 60:.1f} min")
    wall = time.perf_counter() - started
    rows = [comparison_row(name, summaries[name]) for name in runs]
    result = {"data": str(data), "wall_time_s": wall, "jobs": jobs, "rows": rows, "summaries": summaries}
    write_json_atomic(result, out / "comparison.json")
    plot_env_metrics(summaries, out / "env_metrics.png")
    write_text_atomic(out / "comparison.md", comparison_markdown(rows, wall, jobs))
    return result


def comparison_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the table: final and best env metrics, action error, alarms, closed loop."""
    final, best = summary["final"], summary["best"]
    policies = summary.get("closed_loop", {}).get("policies", {})
    planner = policies.get("planner_argmax", {})
    clinician = policies.get("simulated_anesthesiologist", {})
    value = lambda block, key: block.get(key, {}).get("mean", math.nan)
    return {
        "strategy": name,
        "warmup_epochs": summary["warmup_epochs"],
        "env_weight": summary["env_weight"],
        **{f"final_{key}": final[key] for key in ("val_bis_mae", "val_map_mae", "val_reward_mae", "val_value_mae")},
        **{f"best_{key}": best[key]["value"] for key in ("val_bis_mae", "val_map_mae", "val_reward_mae", "val_value_mae")},
        **{f"best_epoch_{key}": best[key]["epoch"] for key in ("val_bis_mae", "val_map_mae")},
        "val_action_mae_ppf": final["val_action_mae_ppf"],
        "val_action_mae_rftn": final["val_action_mae_rftn"],
        "rebound_alarms": len(summary["alarms"]),
        "alarm_metrics": sorted({alarm["metric"] for alarm in summary["alarms"]}),
        "pct_bis_40_60": value(planner, "pct_bis_40_60"),
        "pct_map_below_65": value(planner, "pct_map_below_65"),
        "clinician_pct_bis_40_60": value(clinician, "pct_bis_40_60"),
        "clinician_pct_map_below_65": value(clinician, "pct_map_below_65"),
        "epoch_time_s": summary["epoch_time_s"],
        "total_time_s": summary["total_time_s"],
        "constant_baseline": summary.get("constant_baseline", {}),
    }


def comparison_markdown(rows: list[dict[str, Any]], wall_s: float, jobs: int) -> str:
    """The table as Markdown; env metrics as 'final (best at epoch e)'."""
    header = (
        "| strategy | BIS MAE final (best @ep) | MAP MAE final (best @ep) | reward MAE | value MAE | "
        "action MAE ppf / rftn (mL/h) | rebound alarms | BIS 40–60 % (closed loop) | MAP < 65 % |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        alarms = f"{r['rebound_alarms']}" + (
            f" ({', '.join(m.removeprefix('val_') for m in r['alarm_metrics'])})" if r["alarm_metrics"] else ""
        )
        lines.append(
            f"| {r['strategy']} | {r['final_val_bis_mae']:.2f} ({r['best_val_bis_mae']:.2f} @{r['best_epoch_val_bis_mae']}) "
            f"| {r['final_val_map_mae']:.2f} ({r['best_val_map_mae']:.2f} @{r['best_epoch_val_map_mae']}) "
            f"| {r['final_val_reward_mae']:.3f} | {r['final_val_value_mae']:.2f} "
            f"| {r['val_action_mae_ppf']:.2f} / {r['val_action_mae_rftn']:.2f} | {alarms} "
            f"| {r['pct_bis_40_60']:.1f} | {r['pct_map_below_65']:.1f} |"
        )
    clinician = rows[0] if rows else {}
    baseline = clinician.get("constant_baseline", {})
    notes = [
        "",
        (
            f"Simulated anesthesiologist on the same held-out cases: BIS 40–60 "
            f"{clinician.get('clinician_pct_bis_40_60', math.nan):.1f} %, "
            f"MAP < 65 {clinician.get('clinician_pct_map_below_65', math.nan):.1f} %."
        ),
        (
            f"Predicting the training mean everywhere: reward MAE {baseline.get('val_reward_mae', math.nan):.3f}, "
            f"value MAE {baseline.get('val_value_mae', math.nan):.2f}."
        ),
        f"Wall time {wall_s / 60:.1f} min with {jobs} parallel jobs (one CPU thread each).",
        "",
    ]
    return header + "\n".join(lines) + "\n" + "\n".join(notes)


def plot_env_metrics(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Validation metrics per epoch, one line per strategy; the policy's start is marked where a
    strategy warms up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), constrained_layout=True)
    colors = dict(zip(STRATEGIES, ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple")))
    for ax, (metric, label) in zip(axes.flat, FIGURE_METRICS):
        for name, summary in summaries.items():
            history = summary["history"]
            epochs = [h["epoch"] + 1 for h in history]
            ax.plot(epochs, [h[metric] for h in history], label=name, color=colors.get(name), lw=1.6)
            if summary["warmup_epochs"]:
                ax.axvline(summary["warmup_epochs"] + 0.5, color=colors.get(name), ls=":", lw=1)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(title="strategy")
    fig.suptitle("Validation metrics per epoch (dotted: the policy loss starts after warm-up)")
    write_figure_atomic(fig, path)
    plt.close(fig)
