"""The analysis report of a trained vancomycin IQL run, as one HTML page.

Every figure is also written as a PNG next to the page and embedded in it (base64), so the page
alone can be mailed or archived. Each figure carries one caption line saying how to read it.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np

from dosewise.algos.trained import TrainedIQL
from dosewise.checkpoint import CheckpointError, write_text_atomic
from dosewise.data.loading import DataError, load_table
from dosewise.data.transitions import Transitions, build_transitions
from dosewise.evaluate.figures import save_png
from dosewise.sim.vancomycin import DECISION_HOURS, rollout, sample_cohort
from dosewise.sim.vancomycin_clinician import VancomycinClinician

PATIENT_CURVES = 10  # patients in the Q-curve figure
TRAJECTORY_PATIENTS = 4  # held-out patients whose courses are drawn under both policies


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    caption: str  # one line: how to read it


def training_curves(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scalar series from the run's TensorBoard files: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tb"
    if not tb.is_dir():
        raise CheckpointError(f"{run_dir}: no tb/ folder with training curves; was this folder written by `dosewise train iql`?")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: (np.array([e.step for e in acc.Scalars(tag)]), np.array([e.value for e in acc.Scalars(tag)])) for tag in acc.Tags()["scalars"]
    }


def plot_training(curves: dict, out_dir: Path) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, tag in zip(axes, ("loss/q", "loss/v", "loss/pi"), strict=True):
        if tag in curves:
            ax.plot(*curves[tag])
        ax.set_title(tag)
        ax.set_xlabel("gradient step")
    save_png(fig, out_dir, "training_curves")
    return Figure(
        "training_curves",
        "Training curves",
        "Q and V losses should fall and flatten; a Q loss that climbs means divergence (lower the learning rate).",
    )


def plot_q_v(model: TrainedIQL, data: Transitions, out_dir: Path) -> Figure:
    q = model.q_value(data.observations, data.actions[:, 0])
    v = model.value(data.observations)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(q, bins=40, alpha=0.6, label="Q(s, a_clinician)")
    ax.hist(v, bins=40, alpha=0.6, label="V(s)")
    ax.set_xlabel("value (discounted reward)")
    ax.legend()
    save_png(fig, out_dir, "q_v_distributions")
    return Figure(
        "q_v_distributions",
        "Q and V over the training data",
        "V is an upper expectile of Q over the clinicians' actions: it should sit slightly right of Q.",
    )


def plot_q_curves(model: TrainedIQL, data: Transitions, out_dir: Path) -> Figure:
    starts = np.flatnonzero(data.episode_starts)[:PATIENT_CURVES]
    grid = model.action_grid()
    curves = model.q_curve(data.observations[starts], grid)
    policy = model.policy_action(data.observations[starts])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(curves):
        line = ax.plot(grid, row, lw=1.2, label=f"{data.patient_ids[starts[i]]} (level {data.observations[starts[i], 0]:.0f})")[0]
        ax.axvline(policy[i], color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("action (relative dose change)")
    ax.set_ylabel("Q(s, a)")
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, out_dir, "q_curves")
    return Figure(
        "q_curves",
        f"Q-curves of {len(starts)} patients at their first decision",
        "Each line is Q(s, a) over a in [-1, 1]; the dotted line is the policy's recommendation. Peaks at the edges lie where clinicians rarely acted.",
    )


def plot_sensitivity(model: TrainedIQL, data: Transitions, out_dir: Path) -> Figure:
    median = np.median(data.observations, axis=0)
    names = model.feature_names
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(13, 5.5))
    for j, (ax, name) in enumerate(zip(axes.flat, names, strict=False)):
        lo, hi = model.feature_ranges[name]
        xs = np.linspace(lo, hi, 60)
        states = np.repeat(median[None, :], xs.shape[0], axis=0)
        states[:, j] = xs
        ax.plot(xs, model.policy_action(states))
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    save_png(fig, out_dir, "sensitivity")
    return Figure(
        "sensitivity",
        "Sensitivity of the recommended dose change to each feature",
        "Each panel varies one feature over its training range with the others at their median; vancomycin level should push the dose down as it rises.",
    )


def plot_policy_vs_clinician(model: TrainedIQL, data: Transitions, out_dir: Path) -> Figure:
    policy = model.policy_action(data.observations)
    clinician = data.actions[:, 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.scatter(clinician, policy, s=5, alpha=0.4)
    left.plot([-1, 1], [-1, 1], color="grey", lw=0.8)
    left.set_xlabel("clinician's action")
    left.set_ylabel("policy's action, same state")
    bins = np.linspace(-1, 1, 41)
    right.hist(clinician, bins=bins, alpha=0.6, label="clinician")
    right.hist(policy, bins=bins, alpha=0.6, label="policy")
    right.set_xlabel("action")
    right.legend()
    save_png(fig, out_dir, "policy_vs_clinician")
    return Figure(
        "policy_vs_clinician",
        "Policy vs clinician on the training states",
        "Points on the diagonal agree; the policy's actions are smoother and smaller than the clinicians' in most states.",
    )


def plot_trajectories(model: TrainedIQL, out_dir: Path, seed: int) -> Figure:
    cohort = sample_cohort(TRAJECTORY_PATIENTS, np.random.default_rng(seed))
    clinician = VancomycinClinician(cohort, seed + 1)
    runs = {
        "policy": rollout(cohort, model.policy_action, seed + 2, features=model.feature_names),
        "clinician": rollout(cohort, clinician, seed + 2),
    }
    fig, axes = plt.subplots(3, TRAJECTORY_PATIENTS, figsize=(13, 7), sharex="col")
    rows = (
        ("concentration", "level (mg/L)", (10, 20)),
        ("auc24", "AUC24 (mg*h/L)", (400, 600)),
        ("creatinine", "creatinine (mg/dL)", None),
    )
    for i in range(TRAJECTORY_PATIENTS):
        hours = (np.arange(cohort.steps[i]) + 1) * DECISION_HOURS
        for r, (field, label, band) in enumerate(rows):
            ax = axes[r, i]
            if band:
                ax.axhspan(*band, color="green", alpha=0.08)
            for name, traj in runs.items():
                ax.plot(hours, getattr(traj, field)[: cohort.steps[i], i], label=name)
            if i == 0:
                ax.set_ylabel(label)
            if r == 2:
                ax.set_xlabel("hours")
        axes[0, i].set_title(f"held-out patient {i + 1}")
    axes[0, 0].legend(fontsize=8)
    save_png(fig, out_dir, "trajectories")
    return Figure(
        "trajectories",
        "Courses of held-out simulated patients under both policies",
        "Same patients, same random draws: green bands are the targets (trough-era 10-20 mg/L, AUC24 400-600); a creatinine rise is an AKI.",
    )


def _ope_section(result: dict | None) -> str:
    if not result or "ope" not in result:
        return "<p>No off-policy evaluation in this run's evaluation JSON (run <code>dosewise evaluate --ope</code>).</p>"
    from dosewise.evaluate.vancomycin.off_policy import ESTIMATOR_LABELS

    ope = result["ope"]
    cells = []
    for key, label in ESTIMATOR_LABELS.items():
        entry = ope["estimators"][key]
        if entry["not_estimable"]:
            cells.append((label, "not estimable", html.escape(entry["not_estimable"])))
        else:
            cells.append((label, f"{entry['estimate']:.3f}", f"[{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"))
    for label, key in (("clinicians (logged courses)", "behaviour"), ("true value (simulator)", "true_value")):
        if key in ope:
            cells.append((label, f"{ope[key]['mean']:.3f}", f"[{ope[key]['ci95'][0]:.3f}, {ope[key]['ci95'][1]:.3f}]"))
    rows = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in cells)
    return (
        f"<table><tr><th>estimator</th><th>value</th><th>95 % CI or reason</th></tr>{rows}</table>"
        f"<p class='caption'>Trusted: {html.escape(ope['trusted'] or 'none')}. {html.escape(ope['why'])}. "
        "On simulated data the true value is known; docs/ope_accuracy.md measures every estimator against it.</p>"
    )


def _outcome_section(result: dict | None) -> str:
    if not result or "closed_loop" not in result:
        return "<p>No closed-loop evaluation found (run <code>dosewise evaluate</code> first).</p>"
    cl = result["closed_loop"]
    rows = ""
    for key, label, scale in (
        ("auc_in_target_frac", "AUC24 in 400-600 (% of days)", 100),
        ("aki_rate", "AKI (% of patients)", 100),
        ("mean_return", "return per patient", 1),
    ):
        cells = "".join(
            f"<td>{scale * cl[s][key]['mean']:.1f} [{scale * cl[s][key]['ci95'][0]:.1f}, {scale * cl[s][key]['ci95'][1]:.1f}]</td>"
            for s in ("learned", "clinician", "difference")
        )
        rows += f"<tr><td>{label}</td>{cells}</tr>"
    return (
        f"<p>{cl['patients']} held-out simulated patients (seed {cl['seed']}); mean [95 % CI].</p>"
        f"<table><tr><th>outcome</th><th>learned policy</th><th>clinician</th><th>difference</th></tr>{rows}</table>"
    )


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, evaluation: str | Path | None = None, seed: int = 3000) -> Path:
    """Render ``out_dir/index.html`` (default ``run_dir/report``) and its PNG figures; returns the page path."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    model = TrainedIQL.load(run_dir)
    if not model.run_config.data_path:
        raise DataError(f"{run_dir}: the run does not record its training data")
    frame, _ = load_table(model.run_config.data_path, model.data_config)
    data = build_transitions(frame, model.data_config)
    curves = training_curves(run_dir)
    eval_path = Path(evaluation) if evaluation else None
    if eval_path is None:
        for candidate in (run_dir / "evaluation.json", run_dir.parent / "evaluation.json"):
            if candidate.is_file():
                eval_path = candidate
                break
    result = json.loads(eval_path.read_text()) if eval_path else None
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        plot_training(curves, out_dir),
        plot_q_v(model, data, out_dir),
        plot_q_curves(model, data, out_dir),
        plot_sensitivity(model, data, out_dir),
        plot_policy_vs_clinician(model, data, out_dir),
        plot_trajectories(model, out_dir, seed),
    ]
    blocks = []
    for fig in figures:
        encoded = base64.b64encode((out_dir / f"{fig.name}.png").read_bytes()).decode()
        blocks.append(
            f"<h2>{html.escape(fig.title)}</h2><img src='data:image/png;base64,{encoded}' alt='{fig.name}'>"
            f"<p class='caption'>{html.escape(fig.caption)}</p>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dosewise report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}.caption{{color:#555;font-style:italic}}</style></head>
<body><h1>Vancomycin IQL run <code>{html.escape(str(run_dir))}</code></h1>
<p>{data.n} transitions from {len(data.episode_slices())} patients; {model.step} gradient steps;
config: lr {model.config.lr:g}, gamma {model.config.gamma:g}, hidden {list(model.config.hidden)}, beta {model.config.beta:g}, tau {model.config.tau:g}.</p>
<h2>Closed-loop outcome</h2>{_outcome_section(result)}
<h2>Off-policy evaluation</h2>{_ope_section(result)}
{"".join(blocks)}
</body></html>"""
    page_path = out_dir / "index.html"
    write_text_atomic(page_path, page)
    return page_path
