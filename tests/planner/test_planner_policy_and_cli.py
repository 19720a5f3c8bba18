"""The closed-loop adapter builds exactly the windows the planner was trained on, and
`dosewise train planner` writes a complete run directory."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dosewise.cli import app
from dosewise.config import save_config
from dosewise.data.anesthesia import RATES, VITALS
from dosewise.data.windows import build_windows, split_by_case
from dosewise.planner.config import ClosedLoopConfig
from dosewise.planner.model import PlannerModel
from dosewise.planner.policy import PlannerPolicy, history_window
from dosewise.sim.anesthesia.cases import CaseHistory
from tests.planner.conftest import TINY_WINDOWS, tiny_run


def case_history(frame, case: str, t: int) -> CaseHistory:
    """What `run_cases` shows a policy at step t of a recorded case (one case, N = 1)."""
    rows = frame[frame["case_id"] == case].sort_values("time")
    cohort = SimpleNamespace(
        covariates=SimpleNamespace(**{name: rows[name].to_numpy()[:1].astype(float) for name in ("age", "sex", "height", "weight")}),
        asa=rows["asa"].to_numpy()[:1].astype(float),
    )
    return CaseHistory(
        t=t,
        vitals=rows[list(VITALS)].to_numpy()[None, : t + 1],
        rates=rows[list(RATES)].to_numpy()[None, :t],
        cohort=cohort,
    )


@pytest.mark.parametrize("concentrations", [False, True])
def test_history_window_matches_build_windows(tiny_frame, concentrations):
    config = TINY_WINDOWS.model_copy(update={"concentrations": concentrations})
    windows = build_windows(split_by_case(tiny_frame, config)["train"], config)
    max_len = windows.history.shape[1]
    assert windows.history.shape[2] == len(windows.feature_names) == (12 if concentrations else 8)
    checked = 0
    for i in range(0, len(windows), 7):
        start = tiny_frame[tiny_frame["case_id"] == windows.case_ids[i]]["time"].min()
        t = round((windows.times[i] - start) / 60.0)
        history, mask, static = history_window(case_history(tiny_frame, windows.case_ids[i], t), max_len, concentrations=concentrations)
        np.testing.assert_array_equal(mask[0], windows.history_mask[i])
        np.testing.assert_allclose(history[0], windows.history[i], atol=1e-4)
        np.testing.assert_allclose(static[0], windows.static[i], atol=1e-4)
        checked += 1
    assert checked > 5


def test_a_model_that_reads_the_pumps_concentrations_trains_and_plans(tiny_frame, tmp_path):
    """windows.concentrations: the encoder reads four more features per step, every planning mode
    builds them from the case history, and the saved model loads with them."""
    from dosewise.planner.training import load_planner, train_planner

    run = tiny_run(epochs=1)
    run = run.model_copy(update={"windows": run.windows.model_copy(update={"concentrations": True})})
    parts = split_by_case(tiny_frame, run.windows)
    train_planner(run, *(build_windows(parts[name], run.windows) for name in ("train", "val")), tmp_path)
    model, loaded = load_planner(tmp_path)
    assert model.concentrations and loaded.windows.concentrations
    history = case_history(tiny_frame, parts["train"]["case_id"].iloc[0], 6)
    for mode in ("argmax", "beam", "mcts", "mpc"):
        ppf, rftn = PlannerPolicy(model, mode)(history)
        assert ppf.shape == rftn.shape == (1,) and 0 <= ppf[0] <= 200 and 0 <= rftn[0] <= 200
    window, _, _ = history_window(history, model.max_len, concentrations=True)
    without = window.copy()
    without[..., 8:] = 0.0
    tokens = lambda w: model.tokens(torch.from_numpy(w), torch.ones(1, model.max_len, dtype=torch.bool), torch.zeros(1, 5))[0]
    assert not torch.allclose(tokens(window), tokens(without))  # the encoder reads them


def test_planner_policy_returns_rates(tiny_frame, tiny_windows):
    run = tiny_run()
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len)
    history = case_history(tiny_frame, tiny_windows["train"].case_ids[0], 4)
    ppf, rftn = PlannerPolicy(model)(history)
    assert ppf.shape == rftn.shape == (1,) and ppf.dtype == np.int64
    window, mask, static = history_window(history, run.windows.max_len)
    expected = model.act(torch.from_numpy(window), torch.from_numpy(mask), torch.from_numpy(static))
    assert (ppf[0], rftn[0]) == tuple(expected[0].tolist())


@pytest.mark.parametrize("mode", ["argmax", "beam", "mcts"])
def test_every_planning_mode_keeps_the_dose_limits(tiny_frame, tiny_windows, mode):
    run = tiny_run()
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len)
    with torch.no_grad():  # a policy head that prefers the highest rates
        model.policy_head[-1].bias.view(2, -1)[:, 150:] += 50.0
    history = case_history(tiny_frame, tiny_windows["train"].case_ids[0], 6)
    free = PlannerPolicy(model, mode)(history)
    assert free[0][0] >= 150 and free[1][0] >= 150
    ppf, rftn = PlannerPolicy(model, mode, max_rate=(40, 12), min_rate=(5, 0))(history)
    assert 5 <= ppf[0] <= 40 and 0 <= rftn[0] <= 12


def test_train_planner_command(tiny_cases_file, tmp_path):
    config = tmp_path / "planner.yaml"
    loop = ClosedLoopConfig(cases=2, seed=7, modes=("argmax", "beam", "mcts"), max_rate=(120, 60))
    save_config(tiny_run("warmup", warmup_epochs=1).model_copy(update={"closed_loop": loop}), config)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "planner", "--config", str(config), "--data", str(tiny_cases_file), "--out", str(out), "--epochs", "2", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "planner_mcts" in result.output and "clinician (sim.)" in result.output  # the closed-loop table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["strategy"] == "warmup"
    assert {"val_bis_mae", "val_map_mae", "val_reward_mae", "val_value_mae"} <= set(summary["final"])
    assert isinstance(summary["alarms"], list)
    policies = summary["closed_loop"]["policies"]
    assert set(policies) == {"planner_argmax", "planner_beam", "planner_mcts", "simulated_anesthesiologist"}
    assert "pct_bis_40_60" in policies["planner_argmax"]
    for name in ("model.pt", "config.yaml", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (out / name).is_file(), name


def test_train_planner_command_bad_config_is_one_line(tiny_cases_file, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("strategy:\n  name: greedy\n")
    result = CliRunner().invoke(
        app, ["train", "planner", "--config", str(config), "--data", str(tiny_cases_file), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "strategy.name" in result.output and "Traceback" not in result.output
