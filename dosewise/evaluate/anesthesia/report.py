"""The report of a trained anesthesia planner run, as one HTML page a clinician reads at a glance.

Held-out simulated cases under the planner and under the simulated anesthesiologist (same
patients, same random draws), how well the environment model predicts BIS over its horizon and
what it expects a propofol change to do, next to the simulator's truth, and the training curves
with their alarms. Every figure is a PNG next to the page, embedded in it (base64) and linked, so
the page alone can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from dosewise.checkpoint import CheckpointError, write_text_atomic
from dosewise.evaluate.anesthesia.closed_loop import case_metrics
from dosewise.evaluate.anesthesia.diagnosis import (
    HELD_OUT_SEED,
    PROPOFOL_VARIANTS,
    Snapshot,
    change_accuracy,
    clinician_snapshots,
    counterfactual_changes,
    horizon_predictions,
)
from dosewise.evaluate.figures import save_png
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.model import PlannerModel
from dosewise.planner.policy import planning_modes
from dosewise.planner.training import load_planner
from dosewise.sim.anesthesia.cases import CaseCohort, CaseSpec, CaseTrajectories, run_cases

CASES = 6  # held-out cases simulated by default (the diagnosis states come from them too)
COURSE_PANELS = 3  # of which this many are drawn
# Shorter than the evaluation's 60-240 min cases: the same patients and surgery, a page in seconds.
REPORT_SPEC = CaseSpec(duration_min=(60.0, 120.0))
REPORT_MINUTES = (15, 30, 45, 60)  # decision minutes of the diagnosis states
CLINICIAN = "simulated anesthesiologist"
COLORS = {"planner": "tab:blue", "clinician": "tab:orange"}


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    caption: str  # one line: how to read it
    legend: tuple[str, ...] = ()  # the labels the figure's legend shows


def _legend_labels(fig) -> tuple[str, ...]:
    return tuple(text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts())


# -- held-out cases under both policies --------------------------------------------------------


@dataclass(frozen=True)
class Courses:
    """Held-out cases under the planner and the clinician (common random numbers)."""

    cohort: CaseCohort
    planner_label: str
    planner: CaseTrajectories
    clinician: CaseTrajectories
    states: list[Snapshot]  # the clinician's run cloned at REPORT_MINUTES: the diagnosis states


def simulate_courses(model: PlannerModel, run: PlannerRunConfig, n_cases: int, seed: int, spec: CaseSpec = REPORT_SPEC) -> Courses:
    """`n_cases` held-out cases under the simulated anesthesiologist (cloned at the diagnosis
    minutes on the way) and under the planner in the run's default mode, on the same cohort with
    the same simulator seed: the same patients, stimulation and monitor noise."""
    mode = run.closed_loop.default_mode
    only_default = run.model_copy(update={"closed_loop": run.closed_loop.model_copy(update={"modes": (mode,)})})
    policy = planning_modes(only_default)[f"planner_{mode}"](model)
    states, clinician = clinician_snapshots(n_cases, model.pre_len, spec, seed, minutes=REPORT_MINUTES, to_end=True)
    planner = run_cases(clinician.cohort, policy, seed + 2, spec)  # clinician_snapshots' simulator seed
    return Courses(clinician.cohort, f"planner ({mode})", planner, clinician.trajectories(), states)


def plot_courses(courses: Courses, out_dir: Path) -> Figure:
    panels = min(COURSE_PANELS, courses.cohort.n)
    runs = {courses.planner_label: (courses.planner, COLORS["planner"]), CLINICIAN: (courses.clinician, COLORS["clinician"])}
    in_band = {label: case_metrics(traj, courses.cohort)["pct_bis_40_60"] for label, (traj, _) in runs.items()}
    fig, axes = plt.subplots(4, panels, figsize=(4.6 * panels, 9.5), sharex="col", squeeze=False)
    cov = courses.cohort.covariates
    for i in range(panels):
        seconds = int(courses.clinician.steps[i] * courses.clinician.step_s)
        minutes_s = np.arange(seconds) / 60.0
        minutes_step = np.arange(courses.clinician.steps[i]) * courses.clinician.step_s / 60.0
        bis_ax, map_ax, ppf_ax, rftn_ax = axes[:, i]
        bis_ax.axhspan(40, 60, color="green", alpha=0.1)
        map_ax.axhline(65, color="red", ls="--", lw=1)
        for label, (traj, color) in runs.items():
            bis_ax.plot(minutes_s[::10], traj.bis_true[:seconds:10, i], color=color, lw=1.1, label=label)
            map_ax.plot(minutes_s[::10], traj.map_true[:seconds:10, i], color=color, lw=1.1, label=label)
            ppf_ax.step(minutes_step, traj.rates[: len(minutes_step), i, 0], where="post", color=color, lw=1.1, label=label)
            rftn_ax.step(minutes_step, traj.rates[: len(minutes_step), i, 1], where="post", color=color, lw=1.1, label=label)
        share = " / ".join(f"{in_band[label][i]:.0f}" for label in runs)
        bis_ax.set_title(
            f"case {i + 1}: {cov.age[i]:.0f} y, {cov.weight[i]:.0f} kg\nBIS 40-60 planner / clinician {share} % of maintenance", fontsize=9
        )
        bis_ax.set_ylim(0, 100)
        rftn_ax.set_xlabel("minutes")
        if i == 0:
            bis_ax.set_ylabel("BIS")
            map_ax.set_ylabel("MAP (mmHg)")
            ppf_ax.set_ylabel("propofol 2 % (mL/h)")
            rftn_ax.set_ylabel("remifentanil 20 µg/mL (mL/h)")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    legend = _legend_labels(fig)
    save_png(fig, out_dir, "cases")
    return Figure(
        "cases",
        f"{panels} held-out simulated cases under both policies",
        "Same patients, same surgery and monitor noise: true BIS and MAP every second and the pump rates chosen each minute. "
        "Green band: BIS 40-60; red dashed line: MAP 65 mmHg.",
        legend,
    )


# -- the environment model against the simulator -----------------------------------------------


def plot_horizon(predictions: dict[str, np.ndarray], summary: dict, out_dir: Path) -> Figure:
    pred, observed, noise_free = predictions["pred_bis"], predictions["charted_bis"], predictions["true_bis"]
    k = pred.shape[1]
    steps = np.arange(1, k + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    mae = axes[0]
    mae.plot(steps, np.abs(pred - observed).mean(axis=0), "o-", label="held-out cases: vs charted")
    mae.plot(steps, np.abs(pred - noise_free).mean(axis=0), "s--", label="held-out cases: vs noise-free")
    validation = [summary.get("final", {}).get(f"rollout/bis_mae_h{j}") for j in steps]
    if all(v is not None for v in validation):
        mae.plot(steps, validation, "^:", color="grey", label="validation windows")
    mae.set_xlabel("minutes ahead (horizon step k)")
    mae.set_ylabel("BIS MAE (points)")
    mae.set_xticks(steps)
    mae.set_ylim(bottom=0)
    mae.legend(fontsize=8)
    for ax, j in zip(axes[1:], (0, k - 1), strict=True):
        ax.scatter(noise_free[:, j], pred[:, j], s=12, alpha=0.6)
        ax.plot([0, 100], [0, 100], color="grey", lw=0.8)
        ax.axhspan(40, 60, color="green", alpha=0.06)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"true BIS {j + 1} min ahead (simulator)")
        ax.set_ylabel("predicted BIS (model)")
        ax.set_title(f"k = {j + 1}: MAE {np.abs(pred[:, j] - noise_free[:, j]).mean():.1f} over {len(pred)} states", fontsize=9)
    save_png(fig, out_dir, "bis_prediction")
    return Figure(
        "bis_prediction",
        "Predicted vs true BIS over the model's horizon",
        "For the clinician's actual next doses: the model's expected BIS against the charted and the noise-free BIS. "
        "Error usually grows with k; points on the diagonal are right.",
    )


def plot_dose_response(changes: dict[str, dict[str, np.ndarray]], out_dir: Path) -> Figure:
    fig, (lines, scatter) = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(changes)))
    for (name, arrays), color in zip(changes.items(), colors, strict=True):
        true, pred = arrays["true_bis"], arrays["pred_bis"]
        if not len(true):
            continue
        steps = np.arange(1, true.shape[1] + 1)
        lines.plot(steps, true.mean(axis=0), "-o", color=color, label=f"{name}: simulator")
        lines.plot(steps, pred.mean(axis=0), "--x", color=color, label=f"{name}: model")
        scatter.scatter(true[:, -1], pred[:, -1], s=12, alpha=0.6, color=color, label=name)
    lines.axhline(0, color="grey", lw=0.8)
    lines.set_xlabel("minutes after the change")
    lines.set_ylabel("mean change of BIS vs keeping the rate")
    lines.set_xticks(steps)
    lines.legend(fontsize=7, ncol=2)
    every_true = np.concatenate([a["true_bis"] for a in changes.values()])
    every_pred = np.concatenate([a["pred_bis"] for a in changes.values()])
    accuracy = change_accuracy(every_true, every_pred)
    low = float(min(every_true.min(), every_pred.min(), -1.0))
    high = float(max(every_true.max(), every_pred.max(), 1.0))
    scatter.plot([low, high], [low, high], color="grey", lw=0.8)
    scatter.axhline(0, color="grey", lw=0.5)
    scatter.axvline(0, color="grey", lw=0.5)
    scatter.set_xlabel(f"true change of BIS after {every_true.shape[1]} min")
    scatter.set_ylabel("predicted change")
    scatter.set_title(
        f"direction right in {100 * accuracy['sign_agreement']:.0f} % of {accuracy['sign_counted']} changes of 1 point or more", fontsize=9
    )
    scatter.legend(fontsize=7)
    save_png(fig, out_dir, "dose_response")
    return Figure(
        "dose_response",
        "Counterfactual dose response: propofol changed, remifentanil kept",
        "From the same held-out states, the propofol rate stopped, halved, raised by half or set to the maximum: "
        "the change of BIS the model predicts against the simulator's. A planner can only choose well where these agree.",
    )


# -- training ------------------------------------------------------------------------------------


def epoch_losses(run_dir: Path) -> pd.DataFrame:
    """Training losses per epoch (loss/* columns of csv/metrics.csv; epochs 1-based), empty if absent."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return pd.DataFrame()
    frame = pd.read_csv(path)
    columns = [c for c in frame.columns if c.startswith("loss/")]
    if not columns or "epoch" not in frame:
        return pd.DataFrame()
    per_epoch = frame.dropna(subset=columns, how="all").groupby("epoch")[columns].mean()
    per_epoch.index = per_epoch.index.astype(int) + 1
    return per_epoch


def plot_training(summary: dict, losses: pd.DataFrame, out_dir: Path) -> Figure:
    history = summary.get("history", [])
    epochs = [h["epoch"] + 1 for h in history]
    search = summary.get("search") or {}
    activation = search.get("activation") or []
    panels = [
        ("val_bis_mae", "validation BIS MAE (points)"),
        ("val_map_mae", "validation MAP MAE (mmHg)"),
        ("val_reward_mae", "validation reward MAE"),
        ("val_value_mae", "validation value MAE"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    flat = list(axes.flat)
    alarms = summary.get("alarms") or []
    for ax, (metric, title) in zip(flat, panels, strict=False):
        ax.plot(epochs, [h.get(metric, math.nan) for h in history], "o-", ms=3)
        for alarm in (a for a in alarms if a["metric"] == metric):
            ax.axvline(alarm["epoch"] + 1, color="red", ls="--", lw=1)
            ax.plot(alarm["epoch"] + 1, alarm["value"], "rv", ms=8, label=f"rebound alarm, epoch {alarm['epoch'] + 1}")
        if summary.get("warmup_epochs"):
            ax.axvline(summary["warmup_epochs"] + 0.5, color="grey", ls=":", lw=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax = flat[4]
    for column in ("loss/total", "loss/env", "loss/policy"):
        if column in losses:
            loss_ax.plot(losses.index, losses[column], "o-", ms=3, label=f"train {column.removeprefix('loss/')}")
    for column in ("val_loss/env", "val_loss/policy"):
        if history and column in history[0]:
            loss_ax.plot(epochs, [h[column] for h in history], "s--", ms=3, label=f"validation {column.removeprefix('val_loss/')}")
    loss_ax.set_title("losses", fontsize=10)
    loss_ax.set_xlabel("epoch")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=7)
    act_ax = flat[5]
    if activation:
        low, high = search.get("activation_alarm", (0.0, 1.0))
        act_ax.axhspan(100 * low, 100 * high, color="green", alpha=0.1, label="healthy range")
        act_ax.plot([a["epoch"] + 1 for a in activation], [100 * a["rate"] for a in activation], "o-", ms=3, label="activation")
        for alarm in search.get("activation_alarms") or []:
            act_ax.plot(alarm["epoch"] + 1, 100 * alarm["rate"], "rv", ms=8)
            act_ax.axvline(alarm["epoch"] + 1, color="red", ls="--", lw=1)
        act_ax.set_ylabel("% of windows taking the search's action")
        act_ax.legend(fontsize=7)
    else:
        act_ax.text(0.5, 0.5, "no search during training\n(search preset off)", ha="center", va="center", transform=act_ax.transAxes)
        act_ax.set_xticks([])
        act_ax.set_yticks([])
    act_ax.set_title("MCTS activation", fontsize=10)
    legend = _legend_labels(fig)
    save_png(fig, out_dir, "training")
    return Figure(
        "training",
        f"Training curves ({len(history)} epochs, strategy {summary.get('strategy', '?')})",
        "Validation errors should fall and flatten. A red triangle is a rebound alarm (a metric worse than its best for several epochs) "
        "or an MCTS activation outside its healthy range; the dotted line is the end of the warm-up.",
        legend,
    )


# -- tables ---------------------------------------------------------------------------------------

CLOSED_LOOP_ROWS = (
    ("pct_bis_40_60", "BIS 40-60 (% of maintenance)", "{:.1f}"),
    ("pct_map_below_65", "MAP < 65 (% of case)", "{:.1f}"),
    ("bis_nadir", "BIS nadir at induction", "{:.1f}"),
    ("time_to_bis_60_s", "time to BIS 60 (s)", "{:.0f}"),
    ("mdape", "MDAPE (%)", "{:.1f}"),
    ("propofol_mg_kg_h", "propofol (mg/kg/h)", "{:.2f}"),
    ("remifentanil_ug_kg_min", "remifentanil (µg/kg/min)", "{:.3f}"),
)


def _cell(block: Any, fmt: str) -> str:
    """mean [95 % CI]; '-' where no case reached the metric (None or NaN in the JSON)."""
    if not isinstance(block, dict) or _fmt(block.get("mean"), fmt) == "-":
        return "<td>-</td>"
    ci = block.get("ci95") or []
    interval = f" [{_fmt(ci[0], fmt)}, {_fmt(ci[1], fmt)}]" if len(ci) == 2 else ""
    return f"<td>{_fmt(block['mean'], fmt)}{interval}</td>"


def closed_loop_section(result: dict | None, source: str) -> str:
    """The policies' closed-loop outcomes (a `closed_loop_comparison` result: {cases, seed, policies})."""
    if not result or not isinstance(result.get("policies"), dict) or not result["policies"]:
        return (
            "<p>No closed-loop evaluation in this run's summary.json or evaluation.json (run <code>dosewise evaluate --run RUN</code>). "
            "The cases below show a few held-out patients only.</p>"
        )
    names = list(result["policies"])
    header = "".join(f"<th>{html.escape(name.replace('_', ' '))}</th>" for name in names)
    rows = "".join(
        f"<tr><td>{label}</td>{''.join(_cell(result['policies'][name].get(key), fmt) for name in names)}</tr>"
        for key, label, fmt in CLOSED_LOOP_ROWS
        if any(key in result["policies"][name] for name in names)
    )
    return (
        f"<p>{result.get('cases', '?')} held-out simulated cases (seed {result.get('seed', '?')}), the same patients for every policy; "
        f"mean [95 % CI]. Source: <code>{html.escape(source)}</code>.</p>"
        f"<table><tr><th>outcome</th>{header}</tr>{rows}</table>"
    )


def _closed_loop_source(run_dir: Path, summary: dict, evaluation: Path | None) -> tuple[dict | None, str]:
    """evaluation (or RUN/evaluation.json) when it holds a closed-loop result, else the summary's."""
    for path in [evaluation] if evaluation else [run_dir / "evaluation.json"]:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path}: not a readable evaluation JSON ({err.__class__.__name__})") from None
            block = data.get("closed_loop", data) if isinstance(data, dict) else None
            if isinstance(block, dict) and "policies" in block:
                return block, str(path)
        elif evaluation:
            raise CheckpointError(f"{path}: no such evaluation JSON")
    return summary.get("closed_loop"), str(run_dir / "summary.json")


def alarms_section(summary: dict) -> str:
    alarms = summary.get("alarms") or []
    search_alarms = (summary.get("search") or {}).get("activation_alarms") or []
    if not alarms and not search_alarms:
        return "<p>No rebound or MCTS activation alarms during training.</p>"
    rows = "".join(
        f"<tr><td>rebound</td><td>{html.escape(a['metric'])}</td><td>{a['epoch'] + 1}</td>"
        f"<td>{a['value']:.4g} vs best {a['best']:.4g} (epoch {a['best_epoch'] + 1})</td></tr>"
        for a in alarms
    )
    rows += "".join(
        f"<tr><td>MCTS activation</td><td>rate</td><td>{a['epoch'] + 1}</td>"
        f"<td>{100 * a['rate']:.1f} % outside {100 * a['low']:.0f}-{100 * a['high']:.0f} %</td></tr>"
        for a in search_alarms
    )
    return f"<table><tr><th>alarm</th><th>metric</th><th>epoch</th><th>value</th></tr>{rows}</table>"


def _fmt(value: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(value) if isinstance(value, int | float) and math.isfinite(value) else "-"


def comparison_section(run_dir: Path) -> str:
    """The strategy table of a compare-strategies folder next to the run (comparison.json), else a
    table of the planner runs beside this one (seeds or strategies trained into one folder)."""
    for path in (run_dir / "comparison.json", run_dir.parent / "comparison.json"):
        if path.is_file():
            try:
                rows = json.loads(path.read_text()).get("rows", [])
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            body = "".join(
                f"<tr><td>{html.escape(str(r.get('strategy')))}</td><td>{_fmt(r.get('final_val_bis_mae'))}</td>"
                f"<td>{_fmt(r.get('final_val_map_mae'))}</td><td>{_fmt(r.get('val_action_mae_ppf'))} / {_fmt(r.get('val_action_mae_rftn'))}</td>"
                f"<td>{r.get('rebound_alarms', '-')}</td><td>{_fmt(r.get('pct_bis_40_60'), '{:.1f}')}</td>"
                f"<td>{_fmt(r.get('pct_map_below_65'), '{:.1f}')}</td></tr>"
                for r in rows
            )
            return (
                f"<p>From <code>{html.escape(str(path))}</code>.</p><table><tr><th>strategy</th><th>BIS MAE</th><th>MAP MAE</th>"
                "<th>action MAE ppf / rftn (mL/h)</th><th>rebound alarms</th><th>BIS 40-60 %</th><th>MAP &lt; 65 %</th></tr>"
                f"{body}</table>"
            )
    siblings = sorted(p for p in run_dir.resolve().parent.iterdir() if (p / "summary.json").is_file() and (p / "model.pt").is_file())
    if len(siblings) < 2:
        return "<p>No strategy comparison or sibling runs next to this run.</p>"
    body = ""
    for sibling in siblings:
        try:
            summary = json.loads((sibling / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        final = summary.get("final", {})
        policies = (summary.get("closed_loop") or {}).get("policies", {})
        planner = next((v for k, v in policies.items() if k.startswith("planner_")), {})
        mark = " (this run)" if sibling == run_dir.resolve() else ""
        body += (
            f"<tr><td>{html.escape(sibling.name)}{mark}</td><td>{html.escape(str(summary.get('strategy', '-')))}</td>"
            f"<td>{_fmt(final.get('val_bis_mae'))}</td><td>{_fmt(final.get('val_map_mae'))}</td><td>{len(summary.get('alarms', []))}</td>"
            f"<td>{_fmt(planner.get('pct_bis_40_60', {}).get('mean'), '{:.1f}')}</td></tr>"
        )
    return (
        "<p>Planner runs in the same folder (seeds or strategies).</p><table><tr><th>run</th><th>strategy</th><th>BIS MAE</th>"
        f"<th>MAP MAE</th><th>rebound alarms</th><th>BIS 40-60 % (closed loop)</th></tr>{body}</table>"
    )


# -- the page --------------------------------------------------------------------------------------


def write_planner_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    cases: int = CASES,
    seed: int = HELD_OUT_SEED,
    evaluation: str | Path | None = None,
) -> Path:
    """Render ``out/index.html`` (default ``run_dir/report``) and its PNG figures from a trained
    planner run and `cases` held-out simulated cases (cohort seed `seed`); the closed-loop table
    comes from `evaluation` (default RUN/evaluation.json) or else summary.json. Returns the page path."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file():
        raise CheckpointError(f"{run_dir}: no model.pt; expected a finished `dosewise train planner` run directory")
    if not (run_dir / "summary.json").is_file():
        raise CheckpointError(f"{run_dir}: no summary.json with the training history; expected a finished `dosewise train planner` run")
    if cases < 1:
        raise CheckpointError(f"cases must be at least 1 held-out case, got {cases}")
    model, run = load_planner(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{run_dir / 'summary.json'}: not valid JSON (line {err.lineno})") from None
    out_dir = Path(out) if out else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    courses = simulate_courses(model, run, cases, seed)
    figures = [
        plot_courses(courses, out_dir),
        plot_horizon(horizon_predictions(model, courses.states), summary, out_dir),
        plot_dose_response(counterfactual_changes(model, courses.states, PROPOFOL_VARIANTS), out_dir),
        plot_training(summary, epoch_losses(run_dir), out_dir),
    ]
    closed, source = _closed_loop_source(run_dir, summary, Path(evaluation) if evaluation else None)
    blocks = []
    for fig in figures:
        encoded = base64.b64encode((out_dir / f"{fig.name}.png").read_bytes()).decode()
        blocks.append(
            f"<h2>{html.escape(fig.title)}</h2><a href='{fig.name}.png'><img src='data:image/png;base64,{encoded}' alt='{fig.name}'></a>"
            f"<p class='caption'>{html.escape(fig.caption)}</p>"
        )
    final = summary.get("final", {})
    low, high = REPORT_SPEC.duration_min
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dosewise report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}.caption{{color:#555;font-style:italic}}</style></head>
<body><h1>Anesthesia planner run <code>{html.escape(str(run_dir))}</code></h1>
<p>{summary.get("epochs", "?")} epochs on {summary.get("train_windows", "?")} training windows ({summary.get("val_windows", "?")} validation);
strategy {html.escape(str(summary.get("strategy", "?")))}; {summary.get("parameters", "?")} parameters; default planning mode
<b>{html.escape(run.closed_loop.default_mode)}</b>. Final validation BIS MAE {_fmt(final.get("val_bis_mae"))} points,
MAP MAE {_fmt(final.get("val_map_mae"))} mmHg. Figures: {cases} held-out simulated cases of {low:.0f}-{high:.0f} min (seed {seed}),
diagnosis states at minutes {", ".join(map(str, REPORT_MINUTES))} of the same cases under the simulated anesthesiologist.</p>
<h2>Closed-loop outcome</h2>{closed_loop_section(closed, source)}
<h2>Alarms</h2>{alarms_section(summary)}
<h2>Strategies and seeds</h2>{comparison_section(run_dir)}
{"".join(blocks)}
</body></html>"""
    page_path = out_dir / "index.html"
    write_text_atomic(page_path, page)
    return page_path
