"""`dosewise recommend` for a planner run: the next rates from the case so far, read exactly as
training windows are, the model's predictions under the plan and under the current rates, the
warnings, and the errors a user can cause; and the `data: vitaldb` preset of planner configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dosewise import api
from dosewise.algos.config import IQLRunConfig
from dosewise.cli import app
from dosewise.config import ConfigError, load_config, save_config
from dosewise.data.anesthesia import CANONICAL, RATES, VITALDB, AnesthesiaDataConfig, load_cases
from dosewise.data.loading import DataError
from dosewise.data.windows import build_windows, decision_inputs, split_by_case
from dosewise.planner.config import ClosedLoopConfig, MPCConfig, PlannerRunConfig
from dosewise.planner.model import expected_class
from dosewise.planner.mpc import mpc_plan
from dosewise.planner.recommend import recommend_planner
from dosewise.planner.training import load_planner, train_planner
from tests.planner.conftest import TINY_WINDOWS, tiny_run

runner = CliRunner()
# The tiny run's closed loop: MPC by default, with dose limits below the pump's 200 mL/h.
LOOP = ClosedLoopConfig(cases=0, modes=("mpc", "argmax"), default_mode="mpc", max_rate=(150, 120))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def strict_json(text: str) -> dict:
    """JSON that Python's lenient parser would accept with NaN or Infinity is refused here."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def planner_run(tiny_frame, tmp_path_factory):
    """A planner trained for one epoch on the tiny cases (seconds), MPC as its default mode."""
    run = tiny_run(epochs=1).model_copy(update={"closed_loop": LOOP})
    parts = split_by_case(tiny_frame, run.windows)
    out = tmp_path_factory.mktemp("planner_recommend") / "run"
    torch.set_num_threads(1)
    train_planner(run, *(build_windows(parts[name], run.windows) for name in ("train", "val")), out)
    return out


@pytest.fixture(scope="module")
def raw_cases(tiny_cases_file) -> pd.DataFrame:
    """The tiny cases as `dosewise simulate anesthesia` writes them (canonical column names)."""
    return pd.read_parquet(tiny_cases_file)


def first_rows(raw: pd.DataFrame, n: int, case: int | None = None) -> pd.DataFrame:
    case = raw["case_id"].iloc[0] if case is None else case
    return raw[raw["case_id"] == case].sort_values("time").head(n).reset_index(drop=True)


def write_history(tmp_path, rows: pd.DataFrame, name: str = "history.csv"):
    path = tmp_path / name
    rows.to_csv(path, index=False)
    return path


# -- the window the model reads ----------------------------------------------------------------


@pytest.mark.parametrize("concentrations", [False, True])
def test_decision_inputs_are_the_training_window_at_the_last_step(tiny_frame, concentrations):
    """The history of N steps is read as build_windows reads the window at step N-1 of a case
    that goes on: same features, padding, option flag, covariates (and pump concentrations)."""
    config = TINY_WINDOWS.model_copy(update={"concentrations": concentrations})
    checked = 0
    for case in tiny_frame["case_id"].unique()[:3]:
        rows = tiny_frame[tiny_frame["case_id"] == case].sort_values("time").reset_index(drop=True)
        for n in (1, 4, 12, 17):
            inputs = decision_inputs(rows.head(n), config)
            windows = build_windows(rows.head(n + 1), config)
            assert inputs.steps.tolist() == [n] and inputs.case_ids.tolist() == [str(case)]
            assert inputs.times[0] == rows["time"].iloc[n - 1] == windows.times[-1]
            np.testing.assert_array_equal(inputs.history[0], windows.history[-1])
            np.testing.assert_array_equal(inputs.history_mask[0], windows.history_mask[-1])
            np.testing.assert_array_equal(inputs.static[0], windows.static[-1])
            assert inputs.history_mask[0].sum() == min(n, config.max_len)
            checked += 1
    assert checked == 12


# -- the recommendation ------------------------------------------------------------------------


def test_recommendation_from_the_first_steps_of_a_case(planner_run, raw_cases, tmp_path):
    rows = first_rows(raw_cases, 8)
    rec = api.recommend_planner(planner_run, write_history(tmp_path, rows))
    weight = float(rows["weight"].iloc[0])
    assert rec.case_id == str(rows["case_id"].iloc[0]) and rec.mode == "mpc"  # the run's default mode
    assert rec.time_s == float(rows["time"].iloc[-1]) and rec.history_steps == 8 and rec.window_steps == TINY_WINDOWS.max_len
    assert rec.max_rate_ml_h == (150, 120)  # the run's closed_loop.max_rate
    assert 0 <= rec.propofol_rate_ml_h <= 150 and 0 <= rec.remifentanil_rate_ml_h <= 120
    assert isinstance(rec.propofol_rate_ml_h, int) and isinstance(rec.remifentanil_rate_ml_h, int)
    assert rec.weight_kg == weight
    assert rec.propofol_mg_kg_h == pytest.approx(rec.propofol_rate_ml_h * 20.0 / weight)
    assert rec.remifentanil_ug_kg_min == pytest.approx(rec.remifentanil_rate_ml_h * 20.0 / 60.0 / weight)
    # The rates in force before the decision: the row before the last (the last row's rates are its slot).
    assert rec.current_rate_ml_h == tuple(int(rows[name].iloc[-2]) for name in RATES)
    for prediction in (rec.plan, rec.keep_current):
        assert len(prediction.bis) == len(prediction.map) == TINY_WINDOWS.pre_len
        assert all(0.0 <= b <= 100.0 for b in prediction.bis) and all(0.0 <= m <= 200.0 for m in prediction.map)
        assert prediction.band is None
    assert rec.plan.propofol_rate_ml_h == [rec.propofol_rate_ml_h] * TINY_WINDOWS.pre_len
    assert rec.plan.remifentanil_rate_ml_h == [rec.remifentanil_rate_ml_h] * TINY_WINDOWS.pre_len
    assert rec.keep_current.propofol_rate_ml_h == [rec.current_rate_ml_h[0]] * TINY_WINDOWS.pre_len
    assert math.isfinite(rec.value_plan) and math.isfinite(rec.value_keep_current)
    assert rec.members == 1 and any("no uncertainty band" in note for note in rec.notes)


def test_predictions_are_the_models_rollouts(planner_run, raw_cases, tiny_frame, tmp_path):
    """keep_current is the model's rollout with the current rates repeated, the plan its rollout
    of MPC's chosen rates, and the value the discounted rewards plus the value after them: computed
    here from a training window of the same case and the model's public methods."""
    n = 10
    rows = first_rows(raw_cases, n)
    rec = api.recommend_planner(planner_run, write_history(tmp_path, rows))
    model, run = load_planner(planner_run)
    case = tiny_frame[tiny_frame["case_id"] == str(rows["case_id"].iloc[0])].sort_values("time")
    window = build_windows(case.head(n + 1), run.windows).select(slice(-1, None))  # the window at step n-1
    inputs = tuple(torch.from_numpy(a) for a in (window.history, window.history_mask, window.static))
    current = window.history[0, -1, 5:7].round().astype(np.int64)
    assert rec.current_rate_ml_h == tuple(current.tolist())
    with torch.no_grad():
        memory, padding = model.represent(*inputs)
        chosen = mpc_plan(model, *inputs, MPCConfig(**{**run.closed_loop.mpc.model_dump(), "horizon": run.windows.pre_len}))
        assert (rec.propofol_rate_ml_h, rec.remifentanil_rate_ml_h) == tuple(chosen.action[0].tolist())
        for rates, prediction, value in (
            (current, rec.keep_current, rec.value_keep_current),
            (chosen.action[0].numpy(), rec.plan, rec.value_plan),
        ):
            actions = torch.from_numpy(np.tile(rates, (1, run.windows.pre_len, 1)))
            states = model.unroll(memory, padding, actions)
            np.testing.assert_allclose(prediction.bis, expected_class(model.bis_head(states))[0].numpy(), rtol=1e-5)
            np.testing.assert_allclose(prediction.map, expected_class(model.map_head(states))[0].numpy(), rtol=1e-5)
            rewards = model.reward_in_units(model.reward(states))[0].double().numpy()
            gamma, k = run.windows.gamma, run.windows.pre_len
            expected = (gamma ** np.arange(k) * rewards).sum() + gamma**k * float(model.value_in_units(model.value(states[0, -1])))
            assert value == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(rec.plan.bis, chosen.bis[0].numpy(), rtol=1e-4)  # what MPC itself predicted


def test_max_propofol_is_honoured_by_every_mode(planner_run, raw_cases, tmp_path):
    path = write_history(tmp_path, first_rows(raw_cases, 9))
    for mode in ("argmax", "beam", "mcts", "mpc"):
        rec = api.recommend_planner(planner_run, path, mode=mode, max_propofol=7, max_remifentanil=3)
        assert rec.mode == mode and rec.max_rate_ml_h == (7, 3)
        assert rec.propofol_rate_ml_h <= 7 and rec.remifentanil_rate_ml_h <= 3
        assert max(rec.plan.propofol_rate_ml_h) <= 7 and max(rec.plan.remifentanil_rate_ml_h) <= 3  # the whole plan
    off = api.recommend_planner(planner_run, path, mode="argmax", max_propofol=0)
    assert off.propofol_rate_ml_h == 0 and off.propofol_mg_kg_h == 0.0
    assert off.max_rate_ml_h == (0, 120)  # remifentanil keeps the run's limit
    result = invoke("recommend", "--run", planner_run, "--history", path, "--max-propofol", 4, "--mode", "beam", "--json")
    assert result.exit_code == 0, result.output
    body = strict_json(result.output)
    assert body["propofol_rate_ml_h"] <= 4 and body["max_rate_ml_h"] == {"propofol": 4, "remifentanil": 120}
    assert body["predicted"]["plan_source"].startswith("beam search's best sequence")
    too_high = invoke("recommend", "--run", planner_run, "--history", path, "--max-propofol", 201)
    assert too_high.exit_code == 2 and "--max-propofol" in too_high.output


def test_a_history_shorter_than_the_window_is_a_warning(planner_run, raw_cases, tmp_path):
    short = api.recommend_planner(planner_run, write_history(tmp_path, first_rows(raw_cases, 3), "short.csv"))
    assert short.history_steps == 3
    assert any("the history has 3 steps (3 min) of the 12 (12 min) the model reads" in w for w in short.warnings)
    one = api.recommend_planner(planner_run, write_history(tmp_path, first_rows(raw_cases, 1), "one.csv"))
    assert one.current_rate_ml_h == (0, 0)  # nothing was infused before the case started
    assert any("the history has 1 step (1 min)" in w for w in one.warnings)
    full = api.recommend_planner(planner_run, write_history(tmp_path, first_rows(raw_cases, 15), "full.csv"))
    assert full.history_steps == 15 and not any("the history has" in w for w in full.warnings)


def test_gaps_artefacts_and_unusual_values_are_warnings(planner_run, raw_cases, tmp_path):
    rows = first_rows(raw_cases, 14)
    rows.loc[[9, 10], "BIS"] = np.nan  # two missing BIS values: carried forward by the loader
    rows.loc[11, "MAP"] = 0.0  # a closed transducer: masked as an artefact, then carried forward
    rows.loc[12, "HR"] = 240.0  # possible, but far beyond the training data: not the decision step, no warning
    rows.loc[13, "HR"] = 230.0  # the decision step
    rows.loc[0, "BIS"] = 99.0  # awake, during induction: what every case opens with
    rows["weight"] = 160.0
    rec = api.recommend_planner(planner_run, write_history(tmp_path, rows))
    text = "\n".join(rec.warnings)
    assert "values carried forward over gaps in the file (steps per track): BIS 2, MAP 1" in text
    assert f"1 vital value of case '{rec.case_id}' outside the physiological bounds were masked as missing" in text
    assert "HR = 230 is" in text and "weight = 160 is" in text and "the model extrapolates" in text
    assert "HR = 240" not in text and not any(w.startswith("BIS =") for w in rec.warnings)  # only the decision step, after induction
    assert rec.propofol_mg_kg_h == pytest.approx(rec.propofol_rate_ml_h * 20.0 / 160.0)


def test_several_cases_need_a_case_id(planner_run, raw_cases, tmp_path):
    ids = sorted(raw_cases["case_id"].unique())[:3]
    rows = pd.concat([first_rows(raw_cases, 6, case) for case in ids])
    rows.loc[rows["case_id"] == ids[2], "BIS"] = np.nan  # this case cannot be used
    path = write_history(tmp_path, rows)
    with pytest.raises(DataError, match=f"the history holds 2 cases; choose one with --case-id .*: {ids[0]}, {ids[1]}$"):
        api.recommend_planner(planner_run, path)
    rec = api.recommend_planner(planner_run, path, case_id=str(ids[1]))
    alone = api.recommend_planner(planner_run, write_history(tmp_path, first_rows(raw_cases, 6, ids[1]), "alone.csv"))
    assert rec.case_id == str(ids[1]) and rec.to_dict()["predicted"] == alone.to_dict()["predicted"]
    with pytest.raises(DataError, match=f"case '{ids[2]}' cannot be used: track 'BIS' has no value"):
        api.recommend_planner(planner_run, path, case_id=str(ids[2]))
    result = invoke("recommend", "--run", planner_run, "--history", path, "--case-id", "nope")
    assert result.exit_code == 2 and f"no case 'nope' in the history; its cases: {ids[0]}, {ids[1]}" in result.output


def test_a_history_with_no_complete_step_is_exit_2(planner_run, raw_cases, tmp_path):
    rows = first_rows(raw_cases, 5)
    rows["BIS"] = np.nan
    result = invoke("recommend", "--run", planner_run, "--history", write_history(tmp_path, rows))
    assert result.exit_code == 2
    assert "no usable case: all 1 cases were dropped" in result.output and "track 'BIS' has no value" in result.output
    assert "Traceback" not in result.output


def test_wrong_columns_are_exit_2(planner_run, raw_cases, tmp_path):
    rows = first_rows(raw_cases, 5).rename(columns={"MAP": "mean_pressure"})
    result = invoke("recommend", "--run", planner_run, "--history", write_history(tmp_path, rows))
    assert result.exit_code == 2 and "missing column 'MAP'" in result.output and "found: " in result.output


def test_cli_json_is_strict_and_complete(planner_run, raw_cases, tmp_path):
    path = write_history(tmp_path, first_rows(raw_cases, 7), "case.parquet")
    first_rows(raw_cases, 7).to_parquet(path, index=False)
    result = invoke("recommend", "--run", planner_run / "model.pt", "--history", path, "--json")
    assert result.exit_code == 0, result.output
    body = strict_json(result.output)
    for key in (
        "case_id",
        "time_s",
        "mode",
        "propofol_rate_ml_h",
        "remifentanil_rate_ml_h",
        "propofol_mg_kg_h",
        "remifentanil_ug_kg_min",
        "current_rate_ml_h",
        "predicted",
        "value",
        "warnings",
        "notes",
    ):
        assert key in body, key
    for side in ("plan", "keep_current"):
        assert len(body["predicted"][side]["bis"]) == len(body["predicted"][side]["map"]) == TINY_WINDOWS.pre_len
        assert body["predicted"][side]["band"] is None
        assert isinstance(body["value"][side], float)
    assert body["mode"] == "mpc" and body["history_steps"] == 7
    table = invoke("recommend", "--run", planner_run, "--history", path, "--mode", "argmax")
    assert table.exit_code == 0, table.output
    rec = api.recommend_planner(planner_run, path, mode="argmax")
    lines = [
        f"propofol 20 mg/mL:     {rec.propofol_rate_ml_h} mL/h = {rec.propofol_mg_kg_h:.2f} mg/kg/h",
        f"remifentanil 20 ug/mL: {rec.remifentanil_rate_ml_h} mL/h = {rec.remifentanil_ug_kg_min:.3f} ug/kg/min",
        "plan BIS   " + "   ".join(f"{b:.1f}" for b in rec.plan.bis),
        "keep MAP   " + "   ".join(f"{m:.1f}" for m in rec.keep_current.map),
        "warning: the history has 7 steps",
    ]
    squeezed = " ".join(table.output.split())
    for text in lines:
        assert " ".join(text.split()) in squeezed, text


def test_options_of_the_other_run_kind_are_clear_errors(planner_run, raw_cases, tmp_path):
    iql = tmp_path / "iql"
    iql.mkdir()
    save_config(IQLRunConfig(), iql / "config.yaml")
    path = write_history(tmp_path, first_rows(raw_cases, 4))
    result = invoke("recommend", "--run", iql, "--history", path, "--mode", "mpc")
    assert result.exit_code == 2
    squeezed = " ".join(result.output.split())
    assert f"--mode: for planner runs only; {iql} is an IQL run, which recommends from --state name=value" in squeezed
    with pytest.raises(ConfigError, match="an IQL run; planner recommendations need a run of `dosewise train planner`"):
        api.recommend_planner(iql, path)
    state = invoke("recommend", "--run", planner_run, "--history", path, "--state", "vanco_level=20")
    assert state.exit_code == 2 and "--state: for IQL runs only" in state.output and "is a planner run" in state.output
    missing = invoke("recommend", "--run", planner_run)
    assert missing.exit_code == 2 and "is a planner run: give the case so far with --history" in missing.output
    mode = invoke("recommend", "--run", planner_run, "--history", path, "--mode", "greedy")
    assert mode.exit_code == 2 and "unknown planning mode 'greedy'; expected one of: argmax, beam, mcts, mpc" in mode.output


def test_a_history_on_another_step_is_refused(planner_run, raw_cases, tmp_path):
    """The model was trained on 60 s steps: a frame resampled to 30 s would shift its time base."""
    model, run = load_planner(planner_run)
    frame, report = load_cases(write_history(tmp_path, first_rows(raw_cases, 6)), CANONICAL.model_copy(update={"step_s": 30.0}))
    with pytest.raises(DataError, match="its steps are 30 s apart; the model was trained on steps of 60 s"):
        recommend_planner(model, run, frame, report=report)


# -- the VitalDB preset ------------------------------------------------------------------------


def vitaldb_named(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.rename(columns={"case_id": VITALDB.case_id, "time": VITALDB.time, **VITALDB.tracks})


def test_a_vitaldb_preset_config_loads_vitaldb_files_with_overrides(raw_cases, tmp_path):
    path = write_history(tmp_path, vitaldb_named(first_rows(raw_cases, 10)))
    short = tmp_path / "short.yaml"
    short.write_text("algo: planner\ndata: vitaldb\n")
    plain = load_config(short, PlannerRunConfig).data
    assert plain == VITALDB and plain.tracks["BIS"] == "BIS/BIS"
    frame, report = load_cases(path, plain)
    assert len(frame) == 10 and report.cases == 1
    override = tmp_path / "override.yaml"
    override.write_text("algo: planner\ndata: {preset: vitaldb, step_s: 120, max_gap_steps: 2, tracks: {HR: Solar8000/PLETH_HR}}\n")
    data = load_config(override, PlannerRunConfig).data
    assert data.step_s == 120.0 and data.max_gap_steps == 2 and data.case_id == "caseid"
    assert data.tracks["HR"] == "Solar8000/PLETH_HR" and data.tracks["BIS"] == "BIS/BIS"  # the other tracks stay the preset's
    frame, _ = load_cases(path, data.model_copy(update={"tracks": VITALDB.tracks}))
    assert np.diff(frame["time"].to_numpy()).tolist() == [120.0] * (len(frame) - 1)  # the override's step
    assert AnesthesiaDataConfig.model_validate({"preset": "canonical"}) == CANONICAL
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: planner\ndata: mimic\n")
    with pytest.raises(ConfigError, match="data: Value error, unknown data preset 'mimic'; expected one of: canonical, vitaldb"):
        load_config(bad, PlannerRunConfig)


def test_recommend_reads_a_vitaldb_history_with_the_preset(planner_run, raw_cases, tmp_path):
    rows = first_rows(raw_cases, 8)
    canonical = api.recommend_planner(planner_run, write_history(tmp_path, rows, "canonical.csv"))
    path = write_history(tmp_path, vitaldb_named(rows), "vitaldb.csv")
    result = invoke("recommend", "--run", planner_run, "--history", path, "--data-preset", "vitaldb", "--json")
    assert result.exit_code == 0, result.output
    assert strict_json(result.output) == canonical.to_dict()
    unknown = invoke("recommend", "--run", planner_run, "--history", path, "--data-preset", "mimic")
    assert unknown.exit_code == 2 and "unknown data preset 'mimic'; expected one of: canonical, vitaldb" in unknown.output
