"""`dosewise report` on a planner run: an HTML page with figures of held-out cases under planner and
clinician, BIS predicted per horizon step, the counterfactual dose response and the training
curves with their alarms, next to the closed-loop and strategy tables."""

from __future__ import annotations

import json
import shutil

import matplotlib.image
import numpy as np
import pytest
from typer.testing import CliRunner

from dosewise.cli import app
from dosewise.evaluate.anesthesia.diagnosis import PROPOFOL_VARIANTS, clinician_snapshots, counterfactual_changes, horizon_predictions
from dosewise.evaluate.anesthesia.report import (
    CLINICIAN,
    _closed_loop_source,
    alarms_section,
    closed_loop_section,
    comparison_section,
    epoch_losses,
    plot_courses,
    plot_training,
    simulate_courses,
)
from dosewise.planner.policy import PlannerPolicy
from dosewise.planner.training import load_planner, train_planner
from dosewise.sim.anesthesia.cases import CaseSpec, run_cases
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist
from tests.planner.conftest import tiny_run

FIGURES = ("cases", "bis_prediction", "dose_response", "training")
SHORT = CaseSpec(duration_min=(25.0, 35.0))  # cases for the unit tests: past the diagnosis' 15 and 30 min states


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def planner_run(tmp_path_factory, tiny_windows):
    """A tiny planner trained for two epochs (no closed loop after training)."""
    out = tmp_path_factory.mktemp("planner_report") / "run"
    train_planner(tiny_run(epochs=2), tiny_windows["train"], tiny_windows["val"], out)
    return out


@pytest.fixture(scope="module")
def page(planner_run):
    result = invoke("report", "--run", planner_run, "--cases", 3)
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    return planner_run / "report" / "index.html"


def test_report_page_embeds_and_links_every_figure(page):
    text = page.read_text()
    for name in FIGURES:
        png = page.parent / f"{name}.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 5_000, (name, len(data))
        pixels = matplotlib.image.imread(png)
        assert pixels.std() > 0.01, name  # not one colour
        assert f"href='{name}.png'" in text and f"alt='{name}'" in text, name
    assert text.count("data:image/png;base64,") == len(FIGURES)
    assert "default planning mode\n<b>argmax</b>" in text
    # tiny_run skips the closed loop after training and writes no evaluation.json: the page says so.
    assert "No closed-loop evaluation in this run's summary.json or evaluation.json" in text
    assert "3 held-out simulated cases of 60-120 min (seed 300000)" in text
    assert "No rebound or MCTS activation alarms" in text


def test_report_without_model_is_exit_2(planner_run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(planner_run, broken, ignore=shutil.ignore_patterns("model.pt", "report"))
    result = invoke("report", "--run", broken)
    assert result.exit_code == 2
    assert "no model.pt" in result.output and str(broken) in result.output and "Traceback" not in result.output
    assert not (broken / "report").exists()


def test_courses_share_patients_and_draw_both_policies(planner_run, tmp_path):
    model, run = load_planner(planner_run)
    courses = simulate_courses(model, run, 2, seed=11, spec=SHORT)
    # Common random numbers: both policies on clinician_snapshots' cohort and simulator seed.
    clinician = run_cases(courses.cohort, SimulatedAnesthesiologist(courses.cohort, 12), 13, SHORT)
    planner = run_cases(courses.cohort, PlannerPolicy(model), 13, SHORT)
    np.testing.assert_array_equal(courses.clinician.rates, clinician.rates)
    np.testing.assert_array_equal(courses.clinician.bis_true, clinician.bis_true)
    np.testing.assert_array_equal(courses.planner.rates, planner.rates)
    assert not np.array_equal(courses.planner.rates, courses.clinician.rates)
    # Before the first decision both saw the same patient: the first minute's charted vitals agree.
    np.testing.assert_array_equal(courses.planner.vitals[0], courses.clinician.vitals[0])
    figure = plot_courses(courses, tmp_path)
    assert figure.legend == ("planner (argmax)", CLINICIAN)
    assert (tmp_path / "cases.png").stat().st_size > 5_000


def test_horizon_predictions_compare_with_the_run_that_was_charted(planner_run):
    model, _ = load_planner(planner_run)
    states, run = clinician_snapshots(3, model.pre_len, SHORT, seed=5, minutes=(10, 20), to_end=True)
    assert [t0 for t0, _, _ in states] == [10, 20]
    # A state one minute before the longest case ends has no complete horizon: left out.
    late, _ = clinician_snapshots(3, model.pre_len, SHORT, seed=5, minutes=(10, run.horizon - 1), to_end=True)
    assert [t0 for t0, _, _ in late] == [10]
    found = horizon_predictions(model, states)
    k = model.pre_len
    # Replaying the clinician's actions from the clone charts exactly what the run charted.
    expected = np.concatenate([np.round(run.vitals[t0 + 1 : t0 + k + 1, :, 0].T) for t0, _, _ in states])
    assert found["charted_bis"].shape == (6, k) == found["pred_bis"].shape
    np.testing.assert_array_equal(found["charted_bis"], expected)
    noise_free = np.concatenate([run.bis_true[(t0 + np.arange(1, k + 1)) * 60 - 1].T for t0, _, _ in states])
    np.testing.assert_allclose(found["true_bis"], noise_free)
    assert np.all((found["pred_bis"] >= 0) & (found["pred_bis"] <= 100))


def test_counterfactual_truth_follows_propofol(planner_run):
    model, _ = load_planner(planner_run)
    states, _ = clinician_snapshots(3, model.pre_len, SHORT, seed=5, minutes=(10, 20))
    changes = counterfactual_changes(model, states, PROPOFOL_VARIANTS)
    assert list(changes) == list(PROPOFOL_VARIANTS)
    # The simulator's truth: stopping propofol lets BIS rise (no change where it was stopped
    # already), the pump's top rate makes it fall.
    current = np.concatenate([state.rates[state.k - 1, :, 0] for _, state, _ in states])
    stopped = changes["propofol x0"]["true_bis"][:, -1]
    np.testing.assert_array_equal(stopped > 0, current > 0)
    assert np.all(stopped[current == 0] == 0) and np.count_nonzero(current) >= 3
    assert np.all(changes["propofol max"]["true_bis"][:, -1] < 0)
    assert changes["propofol max"]["pred_bis"].shape == changes["propofol max"]["true_bis"].shape == (6, model.pre_len)


def test_training_figure_marks_alarms(planner_run, tmp_path):
    summary = json.loads((planner_run / "summary.json").read_text())
    summary["alarms"] = [
        {"metric": "val_map_mae", "epoch": 1, "since_epoch": 0, "value": 15.0, "best": 14.0, "best_epoch": 0},
    ]
    summary["search"]["activation"] = [{"epoch": 0, "rate": 0.2}, {"epoch": 1, "rate": 0.95}]
    summary["search"]["activation_alarms"] = [{"epoch": 1, "rate": 0.95, "low": 0.01, "high": 0.8}]
    losses = epoch_losses(planner_run)
    assert list(losses.index) == [1, 2] and "loss/total" in losses  # csv/metrics.csv per epoch, 1-based
    figure = plot_training(summary, losses, tmp_path)
    assert "rebound alarm, epoch 2" in figure.legend and "healthy range" in figure.legend
    assert "train total" in figure.legend and "validation env" in figure.legend
    table = alarms_section(summary)
    assert "<td>val_map_mae</td><td>2</td><td>15 vs best 14 (epoch 1)</td>" in table
    assert "95.0 % outside 1-80 %" in table


def test_closed_loop_table_reads_the_evaluation_json(planner_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(planner_run, run, ignore=shutil.ignore_patterns("report"))
    evaluation = {
        "kind": "planner",
        "closed_loop": {
            "cases": 7,
            "seed": 2000,
            "policies": {
                "clinician": {"pct_bis_40_60": {"mean": 71.234, "ci95": [60.0, 80.5]}, "time_to_bis_60_s": {"mean": None, "ci95": None}},
                "planner_argmax": {"pct_bis_40_60": {"mean": 55.0, "ci95": [50.0, 61.0]}},
            },
        },
    }
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    block, source = _closed_loop_source(run, {}, None)
    html = closed_loop_section(block, source)
    assert "7 held-out simulated cases (seed 2000)" in html
    assert "<td>BIS 40-60 (% of maintenance)</td><td>71.2 [60.0, 80.5]</td><td>55.0 [50.0, 61.0]</td>" in html
    assert "<td>time to BIS 60 (s)</td><td>-</td><td>-</td>" in html  # no case reached it
    assert "MAP &lt; 65" not in html and "MAP < 65" not in html  # rows no policy has are left out


def test_strategy_table_from_comparison_json_or_sibling_runs(planner_run, tmp_path):
    for name in ("seed0", "seed1"):
        shutil.copytree(planner_run, tmp_path / name, ignore=shutil.ignore_patterns("report"))
    siblings = comparison_section(tmp_path / "seed0")
    assert "seed0 (this run)" in siblings and "<td>seed1</td><td>joint</td>" in siblings
    rows = [{"strategy": "warmup", "final_val_bis_mae": 3.21, "final_val_map_mae": 4.5, "rebound_alarms": 1, "pct_bis_40_60": 80.0}]
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": rows}))
    table = comparison_section(tmp_path / "seed0")
    assert "<td>warmup</td><td>3.21</td><td>4.50</td>" in table and "<td>1</td><td>80.0</td>" in table
    assert "seed1" not in table
