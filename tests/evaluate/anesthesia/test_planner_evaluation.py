"""`dosewise evaluate` on a planner run: offline metrics on the run's held-out cases and the closed
loop next to the simulated anesthesiologist and the PID, as strict JSON in the run directory."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from dosewise import api, cli
from dosewise.cli import app
from dosewise.config import save_config
from dosewise.data.windows import WindowConfig
from dosewise.evaluate.anesthesia.offline import planner_offline
from dosewise.evaluate.anesthesia.run_evaluation import PlannerEvaluation
from dosewise.planner.training import load_planner
from dosewise.sim.anesthesia.clinician import simulate_cases
from tests.conftest import SHORT_CASES
from tests.planner.conftest import tiny_run

WINDOWS = WindowConfig(max_len=12, pre_len=3, split=(0.5, 0.25, 0.25), seed=0)  # 8 cases: 4 / 2 / 2


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def planner_run(tmp_path_factory):
    """A tiny planner trained for one epoch through the CLI on 8 simulated cases with a test share."""
    root = tmp_path_factory.mktemp("planner_eval")
    data = root / "cases.parquet"
    simulate_cases(8, seed=0, spec=SHORT_CASES).to_parquet(data, index=False)
    config = tiny_run().model_copy(update={"windows": WINDOWS})
    save_config(config, root / "tiny.yaml")
    trained = invoke("train", "planner", "--data", data, "--out", root / "run", "--config", root / "tiny.yaml", "--quiet")
    assert trained.exit_code == 0, trained.output
    return root / "run", data


@pytest.fixture(scope="module")
def evaluated(planner_run):
    """`dosewise evaluate --run RUN --cases 3` once: the output and the JSON it left in the run."""
    run, _ = planner_run
    result = invoke("evaluate", "--run", run, "--cases", 3)
    assert result.exit_code == 0, result.output
    return result, strict_loads((run / "evaluation.json").read_text())


def test_evaluate_planner_run_writes_strict_json_into_the_run(planner_run, evaluated):
    run, _ = planner_run
    result, evaluation = evaluated
    assert evaluation["kind"] == "planner"
    loop = evaluation["closed_loop"]
    assert loop["cases"] == 3 and loop["seed"] == 2000 and loop["modes"] == ["argmax"]
    assert set(loop["policies"]) == {"clinician", "pid", "planner_argmax"}
    for name, outcome in loop["policies"].items():
        for key in ("pct_bis_40_60", "pct_map_below_65"):
            estimate = outcome[key]
            assert 0.0 <= estimate["mean"] <= 100.0, (name, key, estimate)
            assert estimate["ci95"][0] <= estimate["mean"] <= estimate["ci95"][1], (name, key, estimate)
        assert outcome["propofol_mg_kg_h"]["mean"] > 0.0
    offline = evaluation["offline"]
    assert offline["source"] == "test" and offline["cases"] == 2 and offline["windows"] > 0
    for key in ("bis_mae_per_step", "map_mae_per_step", "reward_mae_per_step"):
        assert len(offline[key]) == WINDOWS.pre_len and all(x > 0.0 for x in offline[key]), (key, offline[key])
    assert all(math.isfinite(x) and x >= 0.0 for x in offline["action_mae_ml_h"].values())
    assert offline["value_mae"] > 0.0
    for text in (
        "clinician",
        "pid",
        "planner_argmax *",
        "default mode (planner_argmax)",
        "BIS 40-60 %",
        "propofol mg/kg/h",
        "test cases",
        "k=3",
    ):
        assert text in result.output
    assert f"wrote {run / 'evaluation.json'}" in result.output.replace("\n", "")


def test_patients_is_the_same_option(planner_run, evaluated, tmp_path):
    run, _ = planner_run
    result = invoke("evaluate", "--run", run, "--patients", 3, "--out", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    assert strict_loads((tmp_path / "b.json").read_text()) == evaluated[1]  # the same cases, seeded


def test_api_record_with_the_shifted_cohort_is_strict_json_and_printed(planner_run):
    run, _ = planner_run
    evaluation = api.evaluate_planner(run, cases=2, seed=7, spec=SHORT_CASES, shifted=True)
    assert isinstance(evaluation, PlannerEvaluation)
    assert evaluation.closed_loop["cases"] == 2 and evaluation.closed_loop["seed"] == 7
    shifted = evaluation.shifted
    assert shifted["cohort"].startswith("age 70-90") and set(shifted["policies"]) == {"clinician", "pid", "planner_argmax"}
    assert shifted["policies"]["pid"] != evaluation.closed_loop["policies"]["pid"]
    data = evaluation.to_dict()
    assert strict_loads(json.dumps(data, allow_nan=False)) == data
    with cli.console.capture() as captured:
        cli.print_planner_evaluation(evaluation)
    assert "shifted cohort (age 70-90" in captured.get() and "closed loop on 2 held-out simulated cases (seed 7)" in captured.get()


def test_iql_run_evaluation_defaults_to_the_run_directory_and_takes_cases(tmp_path):
    data, run = tmp_path / "vanco.csv", tmp_path / "iql"
    api.simulate_vancomycin(data, 30, seed=3)
    api.train_iql_from_file(data, run, api.resolve_iql_run("iql_conservative", data, steps=50), echo=lambda _: None)
    expected = api.evaluate_iql(run, patients=20, seed=7, per_member=True).to_dict()
    for option in ("--cases", "--patients"):
        result = invoke("evaluate", "--run", run, option, 20, "--seed", 7)
        assert result.exit_code == 0, result.output
        assert strict_loads((run / "evaluation.json").read_text()) == json.loads(json.dumps(expected))
        (run / "evaluation.json").unlink()


def test_iql_options_are_an_error_for_a_planner_run(planner_run, tmp_path):
    run, _ = planner_run
    for option in ("--ope", "--per-member", "--no-per-member"):
        result = invoke("evaluate", "--run", run, "--cases", 2, option, "--out", tmp_path / "x.json")
        assert result.exit_code == 2, result.output
        assert f"{run} is a planner run; {option.replace('--no-', '--')} is for IQL runs only" in result.output.replace("\n", "")
    assert not (tmp_path / "x.json").exists()


def test_shifted_is_an_error_for_an_iql_run(tmp_path):
    (tmp_path / "config.yaml").write_text("algo: iql\n")
    result = invoke("evaluate", "--run", tmp_path, "--shifted")
    assert result.exit_code == 2
    assert "is an IQL run; --shifted is for planner runs only" in result.output.replace("\n", "")


def test_missing_explicit_data_file_is_an_error(planner_run, tmp_path):
    run, _ = planner_run
    result = invoke("evaluate", "--run", run, "--cases", 2, "--data", tmp_path / "gone.parquet", "--out", tmp_path / "x.json")
    assert result.exit_code == 2, result.output
    assert "gone.parquet" in result.output and "Traceback" not in result.output


def test_without_a_test_share_the_validation_cases_are_used(planner_run):
    run, data = planner_run
    model, config = load_planner(run)
    no_test = config.model_copy(update={"windows": WINDOWS.model_copy(update={"split": (0.5, 0.5, 0.0)})})
    offline = planner_offline(model, no_test, data)
    assert offline["source"] == "val" and offline["cases"] == 4
    with_test = planner_offline(model, config, data)
    assert with_test["source"] == "test" and with_test["bis_mae_per_step"] != offline["bis_mae_per_step"]


def test_recorded_data_file_gone_falls_back_to_the_training_summary(planner_run, tmp_path):
    run, _ = planner_run
    model, config = load_planner(run)
    summary = strict_loads((run / "summary.json").read_text())
    moved = config.model_copy(update={"data_path": str(tmp_path / "moved.parquet")})
    offline = planner_offline(model, moved, None, summary)
    final = summary["final"]
    assert offline["source"] == "summary" and "moved.parquet not found" in offline["note"]
    assert offline["bis_mae_per_step"] == [final[f"rollout/bis_mae_h{k}"] for k in (1, 2, 3)]
    assert offline["action_mae_ml_h"]["propofol"] == final["val_action_mae_ppf"]


def test_damaged_summary_is_one_clear_error(planner_run, tmp_path):
    run, _ = planner_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("evaluation.json"))
    (copy / "summary.json").write_text("{not json")
    result = invoke("evaluate", "--run", copy, "--cases", 2)
    assert result.exit_code == 2, result.output
    assert f"{copy / 'summary.json'}: not readable JSON (JSONDecodeError)" in result.output.replace("\n", "")
    assert not (copy / "evaluation.json").exists()
