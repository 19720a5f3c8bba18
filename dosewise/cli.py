"""The `dosewise` command line. Every command is a thin layer over the Python API."""

from __future__ import annotations

import contextlib
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
    table.add_row("optional features found", ", ".join(report.optional_features) or "none")
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
    sides = [("learned", "learned policy"), ("clinician", "clinician"), ("difference", "difference")]
    rows = [(result[side], label, side == "difference") for side, label in sides]
    # Baselines on the same patients (`evaluate_vancomycin(baselines=...)`): their outcomes, then minus the clinician.
    for baseline in (value for value in result.values() if isinstance(value, dict) and "outcomes" in value):
        rows += [(baseline["outcomes"], baseline["label"], False), (baseline["difference"], f"{baseline['label']} - clinician", True)]
    cells = [[_fmt(values[key], percent, signed=signed) for _, key, percent in outcomes] for values, _, signed in rows]
    table.add_column("policy", min_width=max(len(label) for _, label, _ in rows))
    for j, (label, _, _) in enumerate(outcomes):
        table.add_column(label, min_width=max(len(row[j]) for row in cells))  # headers wrap, numbers never
    for (_, label, signed), row in zip(rows, cells, strict=True):
        table.add_row(label, *row, style="bold" if signed else None)
    return table


def ope_table(ope: dict) -> Table:
    from dosewise.evaluate.vancomycin.off_policy import ESTIMATOR_LABELS

    table = Table(title="off-policy estimates of the policy's discounted value: estimate [95 % CI]", box=box.SIMPLE_HEAD)
    table.add_column("estimator")
    table.add_column("value", overflow="fold")
    for key, label in ESTIMATOR_LABELS.items():
        entry = ope["estimators"][key]
        text = (
            f"not estimable: {entry['not_estimable']}"
            if entry["not_estimable"]
            else _fmt({"mean": entry["estimate"], "ci95": entry["ci95"]}, percent=False)
        )
        trusted = key == ope["trusted"]
        table.add_row(label + (" (trusted)" if trusted else ""), text, style="bold" if trusted else None)
    table.add_row("clinicians (logged courses)", _fmt(ope["behaviour"], percent=False))
    if "true_value" in ope:
        table.add_row("true value (simulator)", _fmt(ope["true_value"], percent=False), style="bold")
    table.caption = f"trusted: {ope['trusted'] or 'none'} -- {ope['why']}"
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
    run: Annotated[Path, typer.Option(help="Run directory written by `dosewise train iql` or `dosewise train planner`.")],
    out: Annotated[Path | None, typer.Option(help="Evaluation JSON to write (default: RUN/evaluation.json).")] = None,
    cases: Annotated[
        int | None,
        typer.Option(
            "--cases",
            "--patients",
            min=2,
            help="Held-out simulated patients (IQL, default 1000) or cases (planner, default the run's closed_loop.cases, else 50) "
            "for the closed loop.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the held-out cohort (default: 1000 for IQL, the run's closed_loop.seed for a planner); keep it apart from the training data's."
        ),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="The run's data file (default: the path recorded in the run).")] = None,
    per_member: Annotated[
        bool | None,
        typer.Option(help="IQL ensemble: also every member's own policy in closed loop (same patients) and mean +- sd (default: on)."),
    ] = None,
    ope: Annotated[
        bool, typer.Option("--ope", help="IQL: also off-policy estimates (FQE, PDWIS, WDR, ESS) next to the simulator's true value.")
    ] = False,
    shifted: Annotated[
        bool, typer.Option("--shifted", help="Planner: also the closed loop on a shifted cohort (age 70-90, BMI 30-40, more sensitive).")
    ] = False,
) -> None:
    """Evaluate a run: offline metrics, then the policy in closed loop on held-out simulated patients.

    IQL: the critics' offline statistics and the learned policy vs the clinician (an ensemble as
    its mean policy; with --per-member also member by member). Planner: the model's prediction
    errors per horizon step and the policy head's action error on the run's held-out cases, and
    the planner's modes next to the simulated anesthesiologist and the PID. An option of the other
    kind of run (--ope, --per-member for a planner; --shifted for IQL) is an error."""
    from dosewise.api import evaluate_iql, evaluate_planner, run_kind

    run_dir = run.parent if run.suffix == ".pt" else run
    # Without config.yaml (a bare model.pt) the IQL loader says what is missing, as it always has.
    kind = run_kind(run) if (run_dir / "config.yaml").is_file() else "iql"
    given = {"--ope": ope, "--per-member": per_member is not None} if kind == "planner" else {"--shifted": shifted}
    wrong = [name for name, set_ in given.items() if set_]
    if wrong:
        this, other = ("a planner", "IQL") if kind == "planner" else ("an IQL", "planner")
        raise ConfigError(f"{run} is {this} run; {' and '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for {other} runs only")
    out = out if out is not None else run_dir / "evaluation.json"
    if kind == "planner":
        evaluation = evaluate_planner(run, cases, seed, data, shifted=shifted, echo=console.print)
        write_json_atomic(evaluation.to_dict(), out)
        print_planner_evaluation(evaluation)
    else:
        patients = 1000 if cases is None else cases
        evaluation = evaluate_iql(run, patients, 1000 if seed is None else seed, data, per_member=per_member is not False, ope=ope)
        write_json_atomic(evaluation.to_dict(), out)
        print_evaluation(evaluation)
    console.print(f"wrote {out}")


def planner_closed_loop_table(loop: dict, title: str) -> Table:
    """Policy rows x BIS 40-60 %, MAP < 65 %, BIS nadir, propofol: the mean over cases above its
    95 % bootstrap interval (low-high; every outcome is >= 0), so the table fits 80 columns."""
    default = f"planner_{loop['default_mode']}"
    table = Table(title=f"{title}: mean, 95 % CI below", box=box.SIMPLE_HEAD, caption=f"* the run's default mode ({default})")
    table.add_column("policy", no_wrap=True)
    columns = (("BIS 40-60 %", "pct_bis_40_60", 1), ("MAP < 65 %", "pct_map_below_65", 1), ("BIS nadir", "bis_nadir", 1))
    columns += (("propofol mg/kg/h", "propofol_mg_kg_h", 2),)
    for label, _, _ in columns:
        table.add_column(label, justify="right")

    def cell(estimate: dict, digits: int) -> str:
        show = lambda x: "-" if x is None else f"{x:.{digits}f}"
        return f"{show(estimate['mean'])}\n{show(estimate['ci95'][0])}-{show(estimate['ci95'][1])}"

    for name, outcome in loop["policies"].items():
        label = name + (" *" if name == default else "")
        table.add_row(label, *(cell(outcome[key], digits) for _, key, digits in columns), style="bold" if name == default else None)
    return table


def planner_offline_table(offline: dict) -> Table:
    """MAE per horizon step of BIS, MAP and reward, then value MAE and the action error."""
    where = {
        "test": "the run's test cases",
        "val": "the run's validation cases (the run keeps no test cases)",
        "summary": "the last validation epoch of training",
    }[offline["source"]]
    size = f", {offline['windows']} windows of {offline['cases']} cases" if "windows" in offline else ""
    table = Table(title=f"offline: the model along the clinician's actions on {where}{size}", box=box.SIMPLE_HEAD)
    show = lambda x, digits=2: "-" if x is None else f"{x:.{digits}f}"
    steps = len(offline["bis_mae_per_step"])
    table.add_column("MAE")
    for k in range(1, steps + 1):
        table.add_column(f"k={k}", justify="right")
    table.add_column("all steps", justify="right")
    for label, key in (("BIS (points)", "bis"), ("MAP (mmHg)", "map"), ("reward", "reward")):
        digits = 3 if key == "reward" else 2
        table.add_row(label, *(show(x, digits) for x in offline[f"{key}_mae_per_step"]), show(offline[f"{key}_mae"], digits))
    action = offline["action_mae_ml_h"]
    table.caption = (
        f"value MAE {show(offline['value_mae'])}; policy head argmax vs the clinician at the decision step: "
        f"propofol {show(action['propofol'], 1)} mL/h, remifentanil {show(action['remifentanil'], 1)} mL/h"
    )
    if "note" in offline:
        table.caption += f" ({offline['note']})"
    return table


def print_planner_evaluation(evaluation) -> None:
    """The tables of a `PlannerEvaluation`: offline metrics, closed loop (and the shifted cohort)."""
    console.print(planner_offline_table(evaluation.offline))
    loop = evaluation.closed_loop
    console.print(planner_closed_loop_table(loop, f"closed loop on {loop['cases']} held-out simulated cases (seed {loop['seed']})"))
    if evaluation.shifted is not None:
        console.print(planner_closed_loop_table(evaluation.shifted, f"shifted cohort ({evaluation.shifted['cohort']})"))


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
    run: Annotated[Path, typer.Option(help="Run directory written by `dosewise train iql` or `train planner`.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: RUN/report).")] = None,
    evaluation: Annotated[Path | None, typer.Option(help="Evaluation JSON (default: RUN/evaluation.json or next to RUN).")] = None,
    cases: Annotated[int, typer.Option(min=1, help="Planner runs: held-out simulated cases behind the figures (3 are drawn).")] = 6,
    seed: Annotated[int, typer.Option(help="Planner runs: seed of the held-out cases.")] = 300_000,
) -> None:
    """HTML analysis report with PNG figures. IQL: training, Q/V, Q-curves, sensitivity, policy vs clinician, courses.
    Planner: cases under planner and clinician, BIS predicted per horizon step, dose response, training curves and alarms."""
    from dosewise.api import report_iql, report_planner, run_kind

    if run_kind(run) == "planner":
        page = report_planner(run, out, cases=cases, seed=seed, evaluation=evaluation)
    else:
        page = report_iql(run, out, evaluation)
    console.print(f"report written to {page}")


# -- recommend ----------------------------------------------------------------------------------


@app.command("recommend")
@friendly_errors
def recommend_command(
    run: Annotated[Path, typer.Option(help="Run directory or model.pt (of `dosewise train iql` or `train planner`).")],
    state: Annotated[list[str] | None, typer.Option(help="IQL runs: feature value as name=value; repeat for every feature.")] = None,
    history: Annotated[
        Path | None,
        typer.Option(
            help="The case so far (planner runs) or the patient's rows so far (IQL runs: the state is the last row, and "
            "AUC24 and trough are predicted), CSV or Parquet with the training file's columns."
        ),
    ] = None,
    case_id: Annotated[str | None, typer.Option(help="Planner runs: the case to recommend for, when the history holds several.")] = None,
    patient: Annotated[str | None, typer.Option(help="IQL runs: the patient to recommend for, when the history holds several.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="Planner runs: planning mode argmax, beam, mcts or mpc (default: the run's closed_loop.default_mode)."),
    ] = None,
    max_propofol: Annotated[
        int | None, typer.Option(min=0, max=200, help="Planner runs: highest propofol rate, mL/h of 20 mg/mL (default: the run's).")
    ] = None,
    max_remifentanil: Annotated[
        int | None, typer.Option(min=0, max=200, help="Planner runs: highest remifentanil rate, mL/h of 20 ug/mL (default: the run's).")
    ] = None,
    data_preset: Annotated[
        str | None, typer.Option(help="Planner runs: column names of the history, canonical or vitaldb (default: the run's data config).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the recommendation as JSON.")] = False,
    allow_out_of_range: Annotated[
        bool,
        typer.Option(
            "--allow-out-of-range",
            help="IQL runs: recommend even for values outside their physiological range (listed as overrides in the output).",
        ),
    ] = False,
) -> None:
    """Dose recommendation: for an IQL run the next vancomycin dose from one patient state (--state) or
    the patient's rows so far (--history, which adds the predicted AUC24 and trough), for a planner run
    the next propofol and remifentanil rates from the case so far (--history)."""
    from dosewise.api import run_kind

    planner_options = {
        "--case-id": case_id,
        "--mode": mode,
        "--max-propofol": max_propofol,
        "--max-remifentanil": max_remifentanil,
        "--data-preset": data_preset,
    }
    try:
        kind = run_kind(run)
    except CheckpointError:
        if run.suffix != ".pt" or not run.is_file():
            raise
        kind = "iql"  # a bare IQL model.pt carries its own config; its loader checks the file
    if kind == "planner":
        iql_given = [
            name for name, value in (("--state", state), ("--patient", patient), ("--allow-out-of-range", allow_out_of_range)) if value
        ]
        if iql_given:
            raise ConfigError(
                f"{', '.join(iql_given)}: for IQL runs only; {run} is a planner run, which recommends from the case so far (--history CASE.csv)"
            )
        if history is None:
            raise ConfigError(f"{run} is a planner run: give the case so far with --history CASE.csv (or .parquet)")
        _recommend_planner(run, history, case_id, mode, max_propofol, max_remifentanil, data_preset, as_json)
        return
    planner_given = [name for name, value in planner_options.items() if value is not None]
    if planner_given:
        raise ConfigError(
            f"{', '.join(planner_given)}: for planner runs only; {run} is an IQL run, which recommends from "
            "--state name=value or the patient's rows so far (--history FILE)"
        )
    _recommend_iql(run, state or [], history, patient, as_json, allow_out_of_range)


def _recommend_iql(run: Path, state: list[str], history: Path | None, patient: str | None, as_json: bool, allow_out_of_range: bool) -> None:
    from dosewise.algos.recommend import describe_override, parse_state
    from dosewise.algos.trained import TrainedIQL
    from dosewise.api import recommend_iql

    model = TrainedIQL.load(run)
    if state and history is not None:
        raise ConfigError(
            "--state and --history: give one; with --history the state is the history's last row (the patient's latest values)"
        )
    if not state and history is None:
        raise ConfigError(
            f"{run} is an IQL run: give the patient state with --state name=value for each of: {', '.join(model.feature_names)}, "
            "or the patient's rows so far with --history FILE"
        )
    if patient is not None and history is None:
        raise ConfigError("--patient picks a patient of --history FILE; give the history too")
    if history is not None:
        rec = recommend_iql(model, history=history, patient=patient, allow_out_of_range=allow_out_of_range)
    else:
        rec = recommend_iql(model, parse_state(state, model.feature_names, allow_out_of_range), allow_out_of_range=allow_out_of_range)
    if as_json:
        print(json.dumps(rec.to_dict(), indent=2, allow_nan=False))  # strict JSON: NaN was refused above
        return
    for item in rec.overrides:
        console.print(f"[red]override:[/] {describe_override(item)}; recommended anyway (--allow-out-of-range)")
    uncertainty = f" +- {rec.policy_action_sd:.3f} (sd over {rec.members} members)" if rec.members > 1 else ""
    console.print(f"policy action (recommended): [bold]{rec.policy_action:+.3f}[/]{uncertainty}   Q = {rec.q_value:.3f}")
    console.print(f"greedy action (argmax Q):    {rec.greedy_action:+.3f}   Q = {rec.greedy_q_value:.3f}")
    for line in _iql_dose_lines(rec):
        console.print(line, highlight=False)
    for warning in rec.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _iql_dose_lines(rec) -> list[str]:
    """The action in mg and, from a history, the exposure it predicts; a note where either is not known."""
    lines = []
    if rec.dose_mg is not None:
        every = f" every {rec.interval_h:g} h" if rec.interval_h is not None else ""
        change = 100.0 * (rec.dose_mg / rec.current_dose_mg - 1.0) if rec.current_dose_mg else None
        versus = f" ({change:+.0f} % from {rec.current_dose_mg:,.0f} mg)" if change is not None else ""
        lines.append(f"next dose: [bold]{rec.dose_mg:,.0f} mg{every}[/]{versus}")
    if rec.predicted_auc24 is not None:
        lines.append(
            f"predicted from the next administration (at {rec.prediction_from_h:g} h): AUC24 {rec.predicted_auc24:.0f} mg*h/L, "
            f"trough {rec.predicted_trough:.1f} mg/L (MAP fit of {rec.levels_used} level{'s' if rec.levels_used != 1 else ''})"
        )
    lines += [f"note: {note}" for note in rec.notes]
    return lines


def _recommend_planner(
    run: Path,
    history: Path,
    case_id: str | None,
    mode: str | None,
    max_propofol: int | None,
    max_remifentanil: int | None,
    data_preset: str | None,
    as_json: bool,
) -> None:
    from dosewise.api import recommend_planner

    rec = recommend_planner(run, history, case_id, mode, max_propofol, max_remifentanil, data_preset)
    if as_json:
        print(json.dumps(rec.to_dict(), indent=2, allow_nan=False))  # strict JSON: non-finite outputs were refused
        return
    ppf_max, rftn_max = rec.max_rate_ml_h
    console.print(
        f"case {rec.case_id} at {rec.time_s:g} s ({rec.history_steps} steps), mode {rec.mode}, "
        f"limits {ppf_max}/{rftn_max} mL/h, {rec.weight_kg:g} kg"
    )
    console.print(
        f"propofol 20 mg/mL:     [bold]{rec.propofol_rate_ml_h} mL/h[/] = {rec.propofol_mg_kg_h:.2f} mg/kg/h   (current {rec.current_rate_ml_h[0]} mL/h)"
    )
    console.print(
        f"remifentanil 20 ug/mL: [bold]{rec.remifentanil_rate_ml_h} mL/h[/] = {rec.remifentanil_ug_kg_min:.3f} ug/kg/min   "
        f"(current {rec.current_rate_ml_h[1]} mL/h)"
    )
    table = Table(title=f"predicted, steps of {rec.step_s:g} s ahead (one model: no band)", box=box.SIMPLE_HEAD)
    table.add_column("", no_wrap=True)
    for k in range(len(rec.plan.bis)):
        table.add_column(f"+{k + 1}", justify="right", no_wrap=True)
    for label, prediction in (("plan", rec.plan), ("keep", rec.keep_current)):
        rates = zip(prediction.propofol_rate_ml_h, prediction.remifentanil_rate_ml_h, strict=True)
        table.add_row(f"{label} ppf/rftn mL/h", *(f"{ppf}/{rftn}" for ppf, rftn in rates))
        table.add_row(f"{label} BIS", *(f"{value:.1f}" for value in prediction.bis))
        table.add_row(f"{label} MAP", *(f"{value:.1f}" for value in prediction.map), end_section=label == "plan")
    console.print(table)
    console.print(f"plan: {rec.plan_source}; keep: the current rates held")
    console.print(f"learned value (reward units): plan {rec.value_plan:.3f}, keep current {rec.value_keep_current:.3f}")
    for warning in rec.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


# -- export -------------------------------------------------------------------------------------


@app.command("export")
@friendly_errors
def export_command(
    run: Annotated[Path, typer.Option(help="IQL run directory (or its model.pt), e.g. runs/demo/iql.")],
    out: Annotated[Path, typer.Option(help="File to write, e.g. policy.onnx; its description goes to OUT.json.")],
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    check: Annotated[bool, typer.Option(help="Load the written file back and compare it with PyTorch on probe states.")] = True,
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset.")] = 18,
) -> None:
    """Export the vancomycin policy and its critics for serving elsewhere: inputs state [N, D] in raw
    clinical units and action [N, 1]; outputs policy_action, q_value and value, each [N]."""
    from dosewise.algos.export import ExportError, export_iql

    try:
        result = export_iql(run, out, format, check=check, opset=opset)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    diff = ", ".join(f"{name} {value:.1e}" for name, value in result.max_abs_diff.items())
    console.print(f"wrote {result.path} ({result.format}, {result.members} member(s), inputs {', '.join(result.feature_names)})")
    console.print(f"described in {result.sidecar}" + (f"; max |difference| from PyTorch: {diff}" if result.max_abs_diff else ""))


# -- serve --------------------------------------------------------------------------------------

serve_app = typer.Typer(
    invoke_without_command=True,
    help="Serve runs as decision support: HTTP API, web page, audit log, CDS Hooks. `dosewise serve --run RUN`.",
)
token_app = typer.Typer(no_args_is_help=True, help="Bearer tokens of the service (stored hashed in its database).")
serve_app.add_typer(token_app, name="token")
app.add_typer(serve_app, name="serve")
DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Audit and token database URL: sqlite:///FILE or postgresql://... (default: $DOSEWISE_HOME/serve.db)."),
]


@serve_app.callback()
@friendly_errors
def serve_command(
    ctx: typer.Context,
    run: Annotated[
        list[str] | None, typer.Option("--run", help="Run directory to serve (repeat for several; ID=PATH names it). E.g. runs/demo/iql.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; any other than loopback needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    db: DbOption = None,
) -> None:
    """Serve runs: the page at /, the API under /v1 (OpenAPI at /docs), CDS Hooks at /cds-services."""
    if ctx.invoked_subcommand is not None:
        return
    from dosewise.serve.server import serve

    with _store_errors():
        serve(run or [], host=host, port=port, db=db, echo=console.print)


@token_app.command("create")
@friendly_errors
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the token, e.g. ward-3 or pharmacy-bot.")], db: DbOption = None
) -> None:
    """Create a token; it is printed once and stored only as its hash."""
    with _store_errors() as open_store:
        store = open_store(db)
        token = store.create_token(name)
        store.close()
    errors.print(f"token '{name}' created; it is shown only now. Clients send it as 'Authorization: Bearer <token>'.")
    print(token)


@token_app.command("list")
@friendly_errors
def token_list(db: DbOption = None) -> None:
    """The active tokens: name, creation time and first characters (never the token)."""
    with _store_errors() as open_store:
        store = open_store(db)
        tokens = store.tokens()
        store.close()
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("name", "created", "starts with"):
        table.add_column(column)
    for info in tokens:
        table.add_row(info.name, info.created.isoformat(timespec="seconds"), info.prefix + "...")
    console.print(table if tokens else "no token: auth is off (the service then serves loopback only)")


@token_app.command("revoke")
@friendly_errors
def token_revoke(name: Annotated[str, typer.Argument(help="Name of the token.")], db: DbOption = None) -> None:
    """Revoke a token: requests with it are refused from now on (the audit log keeps its name)."""
    with _store_errors() as open_store:
        store = open_store(db)
        revoked = store.revoke_token(name)
        store.close()
    if not revoked:
        raise ConfigError(f"no active token named '{name}' (see `dosewise serve token list`)")
    console.print(f"token '{name}' revoked")


@contextlib.contextmanager
def _store_errors():
    """A database that cannot be opened is one line naming it, like any other bad input."""
    from dosewise.serve.store import Store, StoreError

    try:
        yield Store
    except (StoreError, ValueError) as err:  # ValueError: a token name that is not allowed or taken
        raise ConfigError(str(err)) from None


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
