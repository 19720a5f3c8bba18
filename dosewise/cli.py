"""The `dosewise` command line. Every command is a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from dosewise.algos.recommend import StateError
from dosewise.checkpoint import CheckpointError, IntegrityWarning, WriteError, write_json_atomic
from dosewise.config import ConfigError
from dosewise.data.anesthesia import CaseReport
from dosewise.data.loading import DataError, DataReport

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, help=__doc__)
simulate_app = typer.Typer(no_args_is_help=True, help="Write simulated clinical datasets.")
data_app = typer.Typer(no_args_is_help=True, help="Check and describe dosing data files.")
train_app = typer.Typer(no_args_is_help=True, help="Train offline RL policies.")
app.add_typer(simulate_app, name="simulate")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

console = Console()


@app.callback()
def _main() -> None:
    """Offline RL for drug dosing: simulate, train, evaluate, recommend."""
    import torch

    from dosewise.allocator import keep_freed_memory

    torch.set_num_threads(1)  # the networks are small: one thread beats two contending ones
    keep_freed_memory()  # no page faults for re-allocated activations (dosewise/allocator.py)


errors = Console(stderr=True)


def friendly_errors(command):
    """Bad input, and a file that cannot be written (full disk, read-only or missing folder, no
    permission), end with one clear line on stderr and exit code 2, never a traceback; integrity
    warnings (an unverified run, a skipped damaged checkpoint) are one line each."""
    from dosewise.algos.training import TrainingError

    def show(message, category, filename, lineno, file=None, line=None, default=warnings.showwarning):
        if issubclass(category, IntegrityWarning):
            errors.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = show
                return command(*args, **kwargs)
        except (DataError, ConfigError, CheckpointError, TrainingError, StateError) as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as err:  # a WriteError reads "cannot write FILE: reason"; others name their file
            text = str(err) if isinstance(err, WriteError) else f"{err.filename}: {err.strerror}" if err.filename else str(err)
            errors.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


# -- simulate -----------------------------------------------------------------------------------


@simulate_app.command("vancomycin")
@friendly_errors
def simulate_vancomycin(
    out: Annotated[Path, typer.Option(help="Output file, .csv or .parquet.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of simulated ICU patients.")] = 150,
    seed: Annotated[int, typer.Option(help="Seed of patients, clinician and noise.")] = 0,
) -> None:
    """Simulated vancomycin courses under the simulated clinician, one row per patient per 4 h."""
    from dosewise.api import simulate_vancomycin as simulate

    console.print(f"wrote {simulate(out, patients, seed)} rows for {patients} patients to {out}")


@simulate_app.command("anesthesia")
@friendly_errors
def simulate_anesthesia(
    out: Annotated[Path, typer.Option(help="Output file, .parquet or .csv.")],
    cases: Annotated[int, typer.Option(min=1, help="Number of simulated surgical cases.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of patients, clinicians, stimulation and noise.")] = 0,
) -> None:
    """Simulated TIVA cases under the simulated anesthesiologist, VitalDB-like, one row per case per minute."""
    from dosewise.api import simulate_anesthesia as simulate

    console.print(f"wrote {simulate(out, cases, seed)} rows for {cases} cases to {out}")


# -- data ---------------------------------------------------------------------------------------


def report_table(report: DataReport | CaseReport) -> Table:
    table = Table(title=f"data report: {report.path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if isinstance(report, CaseReport):
        return _case_report_rows(table, report)
    for key in ("rows_total", "rows_blank", "rows_dropped_nan", "rows_valid", "patients", "transitions", "reward_source"):
        table.add_row(key, str(getattr(report, key)))
    for column, count in report.dropped_nan_by_column.items():
        table.add_row(f"  dropped: {column} missing", str(count))
    for name, (lo, hi) in report.feature_ranges.items():
        table.add_row(f"range {name}", f"{lo:g} .. {hi:g}")
    table.add_row("range action", f"{report.action_range[0]:g} .. {report.action_range[1]:g}")
    return table


def _case_report_rows(table: Table, report: CaseReport) -> Table:
    """An anesthesia load report: where the rows went, what was repaired, which cases were dropped and why."""
    for key in ("rows_total", "rows_used", "rows_superseded", "rows_trimmed", "rows_in_dropped_cases", "rows_duplicate"):
        table.add_row(key, str(getattr(report, key)))
    table.add_row("rows_reordered", str(report.rows_reordered))
    table.add_row("cases", str(report.cases))
    table.add_row("steps (rows after resampling)", str(report.rows_after_resampling))
    table.add_row("steps_trimmed", str(report.steps_trimmed))
    for title, counts in (
        ("carried forward", report.values_carried_forward),
        ("artefacts masked", report.artefacts_masked),
        ("rates rounded", report.rates_rounded),
    ):
        for name, count in counts.items():
            if count:
                table.add_row(f"  {title}: {name}", str(count))
    table.add_row("cases_dropped", str(len(report.cases_dropped)))
    for case, reason in report.cases_dropped.items():
        table.add_row(f"  dropped: case {case}", reason)
    return table


@data_app.command("inspect")
@friendly_errors
def data_inspect(
    path: Annotated[Path, typer.Argument(help="CSV or Parquet file.")],
    config: Annotated[
        Path | None, typer.Option(help="Run config (a packaged config name or a YAML path) whose `data:` section maps the columns.")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="vancomycin or anesthesia (default: anesthesia for a planner --config, else from the columns).")
    ] = None,
    data_preset: Annotated[
        str | None, typer.Option(help="Anesthesia column names: canonical or vitaldb (default: detected from the columns).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a dosing file and report what was read, repaired and dropped (vancomycin tables or anesthesia series)."""
    from dosewise.api import inspect_data

    report = inspect_data(path, config, kind=kind, data_preset=data_preset)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        console.print(report_table(report))


# -- train --------------------------------------------------------------------------------------


@train_app.command("iql")
@friendly_errors
def train_iql_command(
    data: Annotated[Path, typer.Option(help="Training data, CSV or Parquet.")],
    out: Annotated[Path, typer.Option(help="Run directory: config, TensorBoard, checkpoints, model.")],
    config: Annotated[
        Path | None,
        typer.Option(help="Run config: a packaged config name or a YAML path (default: iql_conservative, the tuned conservative set)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Override train.steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override train.seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            min=1,
            help="Ensemble members: train seeds seed, seed+1, ..., seed+K-1 in one process on stacked weights; "
            "evaluate and recommend then use their mean, with their spread as uncertainty.",
        ),
    ] = 1,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the update: ~1.35x faster steps at [32, 32], but up to ~30 s to compile.")
    ] = False,
    sweep: Annotated[
        Path | None,
        typer.Option(
            help="Sweep YAML (`grid:` lists of lr, gamma, beta, tau, hidden): every point, once per --seeds seed, "
            "trained in one process; OUT/<point>/ is a run per point, OUT/sweep.json the table."
        ),
    ] = None,
) -> None:
    """Train IQL; writes config.yaml, tb/, checkpoints/, losses.json and model.pt into --out."""
    from dosewise.api import resolve_iql_run, sweep_iql_from_file, train_iql_from_file

    run = resolve_iql_run(config, data, steps, seed)
    common = {"seeds": seeds, "resume": resume, "compile": compile, "show_progress": not quiet, "echo": console.print}
    if sweep is not None:
        result = sweep_iql_from_file(data, out, sweep, run, **common)
        console.print(sweep_table(result.summary))
        console.print(f"wrote {out / 'sweep.json'}; evaluate a point with: dosewise evaluate --run {out}/<point> --out ...")
        return
    result = train_iql_from_file(data, out, run, **common)
    if result.losses is not None:
        console.print(members_table(result.losses))
    console.print(f"model written to {out / 'model.pt'}; TensorBoard: tensorboard --logdir {out / 'tb'}")


def sweep_table(summary: list[dict]) -> Table:
    """Final losses of every sweep point, mean (sd) over seeds (``sweep.json``)."""
    table = Table(title="sweep: final losses, mean (sd) over seeds", box=box.SIMPLE_HEAD)
    for column in ("lr", "gamma", "beta", "tau", "hidden", "loss/q", "loss/v", "loss/pi"):
        table.add_column(column, justify="right")
    for row in summary:
        c, losses = row["config"], row["losses"]
        cells = [f"{c['lr']:g}", f"{c['gamma']:g}", f"{c['beta']:g}", f"{c['tau']:g}", "x".join(map(str, c["hidden"]))]
        table.add_row(*cells, *(f"{losses[k]['mean']:.3f} ({losses[k]['sd']:.3f})" for k in ("loss/q", "loss/v", "loss/pi")))
    return table


def members_table(losses: dict) -> Table:
    """Final losses of every ensemble member and their mean +- sd (``losses.json``)."""
    keys = ("loss/q", "loss/v", "loss/pi")
    table = Table(title="final losses per ensemble member", box=box.SIMPLE_HEAD)
    table.add_column("seed")
    for key in keys:
        table.add_column(key, justify="right")
    for seed, row in losses["per_member"].items():
        table.add_row(seed, *(f"{row[k]:.4f}" for k in keys))
    table.add_row("mean +- sd", *(f"{losses['summary'][k]['mean']:.4f} +- {losses['summary'][k]['sd']:.4f}" for k in keys), style="bold")
    return table


@train_app.command("planner")
@friendly_errors
def train_planner_command(
    data: Annotated[Path, typer.Option(help="Anesthesia cases, CSV or Parquet (e.g. from `dosewise simulate anesthesia`).")],
    out: Annotated[Path, typer.Option(help="Run directory: config, TensorBoard, CSV metrics, checkpoints, model.pt, summary.json.")],
    config: Annotated[
        Path | None, typer.Option(help="Planner config: a YAML file or a config name, e.g. planner_joint (default: planner, the recipe).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override train.epochs.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train the anesthesia planner under one training strategy; summary.json holds the final metrics and alarms."""
    from dosewise.api import resolve_planner_run, train_planner_from_file

    run = resolve_planner_run(config, data, epochs)
    result = train_planner_from_file(run, data, out, show_progress=not quiet, echo=console.print)
    final = result.summary["final"]
    console.print(
        "val: "
        + ", ".join(
            f"{name} {final[name]:.3g}"
            for name in ("val_bis_mae", "val_map_mae", "val_reward_mae", "val_value_mae", "val_action_mae_ppf", "val_action_mae_rftn")
        )
    )
    for alarm in result.summary["alarms"]:
        console.print(
            f"[bold yellow]rebound alarm:[/] {alarm['metric']} {alarm['value']:.3g} at epoch {alarm['epoch']} (best {alarm['best']:.3g} at epoch {alarm['best_epoch']})"
        )
    search = result.summary["search"]
    if search["activation"]:
        rates = ", ".join(f"{100 * entry['rate']:.0f}" for entry in search["activation"])
        console.print(f"MCTS activation rate per epoch (%): {rates}")
    for alarm in search["activation_alarms"]:
        console.print(
            f"[bold yellow]MCTS activation alarm:[/] {100 * alarm['rate']:.1f} % at epoch {alarm['epoch']} (healthy {100 * alarm['low']:.0f}-{100 * alarm['high']:.0f} %)"
        )
    if "closed_loop" in result.summary:
        loop = result.summary["closed_loop"]
        table = Table(
            title=f"closed loop on {loop['cases']} held-out simulated cases (seed {loop['seed']}): mean [95 % CI]", box=box.SIMPLE_HEAD
        )
        table.add_column("policy")
        for column in ("BIS 40-60 %", "MAP < 65 %", "BIS nadir"):
            table.add_column(column, no_wrap=True)  # headers short, numbers never wrap
        for name, outcome in loop["policies"].items():
            table.add_row(
                name.replace("simulated_anesthesiologist", "clinician (sim.)"),
                *(
                    f"{outcome[key]['mean']:.1f} [{outcome[key]['ci95'][0]:.1f}, {outcome[key]['ci95'][1]:.1f}]"
                    for key in ("pct_bis_40_60", "pct_map_below_65", "bis_nadir")
                ),
            )
        console.print(table)
    console.print(f"summary: {out / 'summary.json'}; TensorBoard: tensorboard --logdir {out / 'tb'}")


@app.command("compare-strategies")
@friendly_errors
def compare_strategies_command(
    data: Annotated[Path, typer.Option(help="Anesthesia cases, CSV or Parquet (e.g. from `dosewise simulate anesthesia`).")],
    out: Annotated[Path, typer.Option(help="Directory for the five runs, comparison.json/.md and env_metrics.png.")],
    config_dir: Annotated[
        Path | None, typer.Option(help="Directory with planner_<strategy>.yaml for the five strategies (default: the packaged configs).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override train.epochs of every strategy.")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Strategies trained at once, one CPU thread each.")] = 2,
    seed: Annotated[int | None, typer.Option(help="Override train.seed of every strategy (initialisation, minibatches).")] = None,
) -> None:
    """Train joint, warmup, weighted, detach and alternating on the same data and seed; table + figure."""
    from dosewise.api import compare_planner_strategies

    result = compare_planner_strategies(data, out, config_dir, epochs=epochs, jobs=jobs, echo=console.print, seed=seed)
    table = Table(title=f"planner strategies on {data} ({result['wall_time_s'] / 60:.1f} min)", box=box.SIMPLE_HEAD)
    for column in ("strategy", "BIS MAE", "MAP MAE", "reward MAE", "value MAE", "action MAE ppf/rftn", "alarms", "BIS 40-60 %", "MAP<65 %"):
        table.add_column(column)
    for r in result["rows"]:
        table.add_row(
            r["strategy"],
            f"{r['final_val_bis_mae']:.2f} (best {r['best_val_bis_mae']:.2f})",
            f"{r['final_val_map_mae']:.2f} (best {r['best_val_map_mae']:.2f})",
            f"{r['final_val_reward_mae']:.3f}",
            f"{r['final_val_value_mae']:.2f}",
            f"{r['val_action_mae_ppf']:.1f}/{r['val_action_mae_rftn']:.1f}",
            str(r["rebound_alarms"]),
            f"{r['pct_bis_40_60']:.1f}",
            f"{r['pct_map_below_65']:.1f}",
        )
    console.print(table)
    console.print(f"table: {out / 'comparison.md'}; figure: {out / 'env_metrics.png'}")


# -- evaluate -----------------------------------------------------------------------------------


def _fmt(estimate: dict, percent: bool, signed: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    sign = "+" if signed else ""
    lo, hi = (scale * x for x in estimate["ci95"])
    return f"{scale * estimate['mean']:{sign}.1f} [{lo:{sign}.1f}, {hi:{sign}.1f}]"


def closed_loop_table(result: dict) -> Table:
    title = f"closed loop on {result['patients']} held-out simulated patients (seed {result['seed']}): mean [95 % CI]"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    outcomes = (
        ("AUC24 in 400-600 (% of days)", "auc_in_target_frac", True),
        ("AKI (% of patients)", "aki_rate", True),
        ("return per patient", "mean_return", False),
    )
    sides = (("learned", "learned policy"), ("clinician", "clinician"), ("difference", "difference"))
    cells = [[_fmt(result[side][key], percent, signed=side == "difference") for _, key, percent in outcomes] for side, _ in sides]
    table.add_column("policy", min_width=max(len(label) for _, label in sides))
    for j, (label, _, _) in enumerate(outcomes):
        table.add_column(label, min_width=max(len(row[j]) for row in cells))  # headers wrap, numbers never
    for (side, label), row in zip(sides, cells, strict=True):
        table.add_row(label, *row, style="bold" if side == "difference" else None)
    return table


def ope_table(ope: dict) -> Table:
    from dosewise.evaluate.vancomycin.ope import OPE_ROWS

    table = Table(title="off-policy estimates of the policy's discounted value vs the truth: mean [95 % CI]", box=box.SIMPLE_HEAD)
    table.add_column("estimator")
    table.add_column("value", no_wrap=True)
    for key, label in OPE_ROWS:
        table.add_row(label, _fmt(ope[key], percent=False), style="bold" if key == "true_value" else None)
    table.caption = f"effective sample size {ope['ess']['mean']:.1f} of {ope['episodes']} patients; below ~10, IS-based estimates rest on a handful of courses"
    return table


def offline_table(stats: dict) -> Table:
    table = Table(title="offline statistics (the critics on the training data)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in stats.items():
        text = f"{value['mean']:.3f} (sd {value['std']:.3f})" if isinstance(value, dict) else f"{value:.4g}"
        table.add_row(key, text)
    return table


@app.command("evaluate")
@friendly_errors
def evaluate_command(
    run: Annotated[Path, typer.Option(help="Run directory written by `dosewise train iql`.")],
    out: Annotated[Path, typer.Option(help="Evaluation JSON to write.")],
    patients: Annotated[int, typer.Option(min=2, help="Held-out simulated patients for the closed loop.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the held-out cohort; keep it apart from the training data's.")] = 1000,
    data: Annotated[Path | None, typer.Option(help="Training data (default: the path recorded in the run).")] = None,
    per_member: Annotated[
        bool, typer.Option(help="For an ensemble run, also every member's own policy in closed loop (same patients) and mean +- sd.")
    ] = True,
    ope: Annotated[
        bool, typer.Option("--ope", help="Also off-policy estimates (FQE, PDWIS, WDR, ESS) next to the simulator's true value.")
    ] = False,
) -> None:
    """Offline statistics of the critics, and the learned policy vs the clinician in closed loop.

    An ensemble run is evaluated as its mean policy; with --per-member also member by member."""
    from dosewise.api import evaluate_iql

    evaluation = evaluate_iql(run, patients, seed, data, per_member=per_member, ope=ope)
    write_json_atomic(evaluation.to_dict(), out)
    print_evaluation(evaluation)
    console.print(f"wrote {out}")


def print_evaluation(evaluation) -> None:
    """The tables of an `IQLEvaluation`: offline statistics, closed loop, OPE, ensemble members."""
    console.print(offline_table(evaluation.offline))
    console.print(closed_loop_table(evaluation.closed_loop))
    if evaluation.ope is not None:
        console.print(ope_table(evaluation.ope))
    if evaluation.ensemble is not None:
        summary, n = evaluation.ensemble["summary"], len(evaluation.ensemble["seeds"])
        console.print(
            f"{n} members on their own (mean +- sd): "
            f"AUC24 in target {100 * summary['auc_in_target_frac']['mean']:.1f} +- {100 * summary['auc_in_target_frac']['sd']:.1f} %, "
            f"AKI {100 * summary['aki_rate']['mean']:.1f} +- {100 * summary['aki_rate']['sd']:.1f} %, "
            f"return {summary['mean_return']['mean']:.2f} +- {summary['mean_return']['sd']:.2f}"
        )


@app.command("report")
@friendly_errors
def report_command(
    run: Annotated[Path, typer.Option(help="Run directory written by `dosewise train iql`.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: RUN/report).")] = None,
    evaluation: Annotated[Path | None, typer.Option(help="Evaluation JSON (default: RUN/evaluation.json or next to RUN).")] = None,
) -> None:
    """HTML analysis report with PNG figures: training, Q/V, Q-curves, sensitivity, policy vs clinician, courses."""
    from dosewise.api import report_iql

    console.print(f"report written to {report_iql(run, out, evaluation)}")


# -- recommend ----------------------------------------------------------------------------------


@app.command("recommend")
@friendly_errors
def recommend_command(
    run: Annotated[Path, typer.Option(help="Run directory or model.pt.")],
    state: Annotated[list[str], typer.Option(help="Feature value as name=value; repeat for every feature.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the recommendation as JSON.")] = False,
    allow_out_of_range: Annotated[
        bool,
        typer.Option(
            "--allow-out-of-range",
            help="Recommend even for values outside their physiological range (listed as overrides in the output).",
        ),
    ] = False,
) -> None:
    """Dose recommendation for one patient state."""
    from dosewise.algos.recommend import describe_override, parse_state
    from dosewise.algos.trained import TrainedIQL
    from dosewise.api import recommend_iql

    model = TrainedIQL.load(run)
    rec = recommend_iql(model, parse_state(state, model.feature_names, allow_out_of_range), allow_out_of_range=allow_out_of_range)
    if as_json:
        print(json.dumps(rec.to_dict(), indent=2, allow_nan=False))  # strict JSON: NaN was refused above
        return
    for item in rec.overrides:
        console.print(f"[red]override:[/] {describe_override(item)}; recommended anyway (--allow-out-of-range)")
    uncertainty = f" +- {rec.policy_action_sd:.3f} (sd over {rec.members} members)" if rec.members > 1 else ""
    console.print(f"policy action (recommended): [bold]{rec.policy_action:+.3f}[/]{uncertainty}   Q = {rec.q_value:.3f}")
    console.print(f"greedy action (argmax Q):    {rec.greedy_action:+.3f}   Q = {rec.greedy_q_value:.3f}")
    for warning in rec.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


# -- demo ---------------------------------------------------------------------------------------


@app.command("demo")
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder of the demo (replaced if it holds an earlier demo).")] = Path("runs/demo"),
    patients: Annotated[int, typer.Option(min=2, help="Patients in the training data.")] = 150,
    steps: Annotated[int, typer.Option(min=1, help="IQL gradient steps.")] = 5000,
    eval_patients: Annotated[int, typer.Option(min=2, help="Held-out patients for the closed loop.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the training data and of training.")] = 0,
) -> None:
    """Vancomycin end to end on embedded defaults: simulate -> train -> evaluate -> outcome table -> report."""
    from dosewise.api import run_demo

    result = run_demo(out, patients, steps, eval_patients, seed, echo=console.print)
    console.print(report_table(result.report))
    print_evaluation(result.evaluation)
    console.print(f"data {result.data}, run {result.run_dir}, evaluation {result.evaluation_path}, report {result.page}")


if __name__ == "__main__":
    app()
