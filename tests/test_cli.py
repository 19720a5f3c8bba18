"""The CLI on a small run, end to end, and its error handling (one line, exit code 2, no traceback)."""

import json

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
    for key in ("fqe", "wis", "wdr", "ess", "true_value"):
        assert key in result["ope"]
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
