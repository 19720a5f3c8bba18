"""The CLI on a small run, end to end, and its error handling (one line, exit code 2, no traceback)."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from dosewise.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "vanco.csv", root / "run"
    result = invoke("simulate", "vancomycin", "--patients", 40, "--seed", 3, "--out", data)
    assert result.exit_code == 0, result.output
    result = invoke("train", "iql", "--data", data, "--out", run, "--steps", 200, "--quiet", "--config", "iql_conservative")
    assert result.exit_code == 0, result.output
    return root, data, run


@pytest.mark.slow
def test_simulate_inspect_train_evaluate_recommend(small_run):
    root, data, run = small_run
    inspected = invoke("data", "inspect", data, "--json")
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.output)
    assert report["rows_valid"] == report["transitions"] == report["rows_total"] - report["rows_dropped_nan"]
    assert report["patients"] == 40
    assert report["optional_features"] == ["dose_mg", "interval_h", "hours_since_dose", "weight_kg", "age", "dialysis"]
    shown = invoke("data", "inspect", data)
    assert "optional features found" in shown.output and "hours_since_dose" in shown.output

    for name in ("config.yaml", "model.pt", "tb"):
        assert (run / name).exists()

    out = root / "eval.json"
    evaluated = invoke("evaluate", "--run", run, "--patients", 30, "--out", out, "--ope")
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(out.read_text())
    assert result["num_transitions"] == report["transitions"]
    for key in ("q_stats", "v_stats", "greedy_q", "behavior_q", "mc_return"):
        assert key in result
    for side in ("learned", "clinician", "difference"):
        assert set(result["closed_loop"][side]) == {"auc_in_target_frac", "aki_rate", "mean_return"}
    assert set(result["ope"]["estimators"]) == {"twins", "fqe", "wis", "wdr"}
    assert result["ope"]["default_estimator"] == "twins" and result["ope"]["why"]
    for entry in result["ope"]["estimators"].values():  # a number with its interval, or null and the reason
        assert (entry["estimate"] is None) == (entry["ci95"] is None) == (entry["not_estimable"] is not None)
    assert "trusted:" in evaluated.output
    low, high = result["ope"]["true_value"]["ci95"]
    assert low <= result["ope"]["true_value"]["mean"] <= high
    assert "true value" in evaluated.output
    assert "AKI" in evaluated.output and "learned policy" in evaluated.output and "difference" in evaluated.output

    state = ["vanco_level=25", "creatinine=1.1", "wbc=12", "bun=18", "temperature=38.2", "sbp=118", "heart_rate=96"]
    state += ["dose_mg=1250", "interval_h=12", "hours_since_dose=4", "weight_kg=80", "age=60", "dialysis=0"]  # simulated data is dose-aware
    rec = invoke("recommend", "--run", run, *[x for s in state for x in ("--state", s)], "--json")
    assert rec.exit_code == 0, rec.output
    body = json.loads(rec.output)
    assert -1 <= body["policy_action"] <= 1 and len(body["q_curve"]) == 101


@pytest.mark.slow
def test_resume_needs_a_flag_and_a_checkpoint(small_run):
    _, data, run = small_run
    again = invoke("train", "iql", "--data", data, "--out", run, "--steps", 200, "--quiet")
    assert again.exit_code == 2 and "--resume" in again.output


@pytest.mark.slow
def test_recommend_errors_are_one_clear_line(small_run):
    _, _, run = small_run
    missing = invoke("recommend", "--run", run, "--state", "vanco_level=25")
    assert missing.exit_code == 2
    assert "missing feature" in missing.output and "creatinine" in missing.output
    assert "Traceback" not in missing.output
    bad = invoke("recommend", "--run", run, "--state", "vanco_level=high")
    assert bad.exit_code == 2 and "vanco_level" in bad.output and "not a number" in bad.output


def test_bad_data_file_is_one_clear_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "patient_id,time,vanco_level,creatinine,wbc,bun,temperature,sbp,heart_rate,action,reward\n"
        "P1,0,12,1.0,9,15,37,120,80,0.1,1\n"
        "P1,4,12,abc,9,15,37,120,80,0.1,1\n"
    )
    result = invoke("data", "inspect", path)
    assert result.exit_code == 2
    assert "line 3" in result.output and "creatinine" in result.output and "P1" in result.output
    assert "Traceback" not in result.output


def test_missing_run_and_bad_config_are_clear(tmp_path):
    result = invoke("evaluate", "--run", tmp_path, "--out", tmp_path / "x.json")
    assert result.exit_code == 2 and "model.pt" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("iql:\n  lr: -1\n")
    result = invoke("data", "inspect", tmp_path / "x.csv", "--config", config)
    assert result.exit_code == 2 and "iql.lr" in result.output


def test_recommend_from_a_history_answers_in_mg_with_the_predicted_exposure(small_run):
    from dosewise import api

    _, data, run = small_run
    first = pd.read_csv(data)["patient_id"].iloc[0]
    listed = invoke("recommend", "--run", run, "--history", data)
    assert listed.exit_code != 0 and first in listed.output and "--patient" in listed.output
    both = invoke("recommend", "--run", run, "--history", data, "--patient", first, "--state", "vanco_level=20")
    assert both.exit_code != 0 and "one" in both.output

    shown = invoke("recommend", "--run", run, "--history", data, "--patient", first, "--json")
    assert shown.exit_code == 0, shown.output
    answer = json.loads(shown.output)
    expected = api.recommend_iql(run, history=data, patient=first)
    for key in ("dose_mg", "interval_h", "current_dose_mg", "predicted_auc24", "predicted_trough", "levels_used"):
        assert answer[key] == pytest.approx(getattr(expected, key)), key
    assert answer["predicted_auc24"] > 0 and answer["dose_mg"] > 0
    text = invoke("recommend", "--run", run, "--history", data, "--patient", first)
    assert text.exit_code == 0 and "mg every" in text.output and "AUC24" in text.output
