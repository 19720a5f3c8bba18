"""The Python API: every function returns a typed record, and the CLI prints exactly what it returns."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dosewise import api
from dosewise.algos.trained import TrainedIQL
from dosewise.checkpoint import CheckpointError
from dosewise.cli import app
from dosewise.config import ConfigError, save_config

STATE = {"vanco_level": 25.0, "creatinine": 1.1, "wbc": 12.0, "bun": 18.0, "temperature": 38.2, "sbp": 118.0, "heart_rate": 96.0}
# Simulated data is dose-aware, so its models need the regimen and covariates too.
STATE |= {"dose_mg": 1250.0, "interval_h": 12.0, "hours_since_dose": 4.0, "weight_kg": 80.0, "age": 60.0, "dialysis": 0.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    rows = api.simulate_vancomycin(root / "vanco.parquet", patients=30, seed=5)
    run = api.resolve_iql_run("iql_conservative", root / "vanco.parquet", steps=120, seed=2)
    result = api.train_iql_from_file(root / "vanco.parquet", root / "run", run, seeds=2, echo=lambda _: None)
    return root, rows, result


def test_training_returns_what_it_did(trained):
    root, rows, result = trained
    assert isinstance(result, api.IQLTraining)
    assert result.report.rows_total == rows and result.report.patients == 30
    assert result.transitions == result.report.transitions and result.seeds == [2, 3]
    assert result.run.train.steps == 120 and result.run.data_path == str((root / "vanco.parquet").resolve())
    assert set(result.losses["per_member"]) == {"2", "3"}
    assert (result.run_dir / "model.pt").exists()
    assert api.inspect_data(root / "vanco.parquet").rows_valid == result.report.rows_valid


def test_evaluation_is_a_record_and_its_json_is_the_cli_file(trained, tmp_path):
    _root, _, result = trained
    evaluation = api.evaluate_iql(result.run_dir, patients=20, seed=7)
    assert isinstance(evaluation, api.IQLEvaluation) and evaluation.ope is None
    assert evaluation.offline["num_transitions"] == result.transitions
    assert set(evaluation.closed_loop) >= {"learned", "clinician", "difference"}
    assert evaluation.ensemble["seeds"] == [2, 3] and set(evaluation.ensemble["per_member"]) == {"2", "3"}
    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["evaluate", "--run", str(result.run_dir), "--patients", "20", "--seed", "7", "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text()) == json.loads(json.dumps(evaluation.to_dict()))


def test_recommendation_carries_the_ensemble_and_matches_the_cli(trained):
    _, _, result = trained
    rec = api.recommend_iql(result.run_dir, STATE)
    model = TrainedIQL.load(result.run_dir)
    obs = np.array([[STATE[name] for name in model.feature_names]], dtype=np.float32)
    assert isinstance(rec, api.DoseRecommendation) and rec.members == 2
    assert rec.policy_action == pytest.approx(float(model.policy_action(obs)[0]))
    assert rec.member_actions == pytest.approx(model.policy_members(obs)[:, 0].tolist())
    assert rec.policy_action_sd == pytest.approx(float(np.std(rec.member_actions, ddof=1)), rel=1e-5)
    args = ["recommend", "--run", str(result.run_dir), "--json"] + [x for k, v in STATE.items() for x in ("--state", f"{k}={v}")]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output) == json.loads(json.dumps(rec.to_dict()))


def test_a_bad_config_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no config of that name"):
        api.resolve_iql_run("no_such_config", tmp_path / "data.csv")


def test_planner_training_returns_the_run_with_its_closed_loop(tiny_cases_file, tmp_path):
    from dosewise.planner.config import ClosedLoopConfig
    from dosewise.planner.policy import PlannerPolicy
    from dosewise.planner.training import PlannerRun, load_planner
    from dosewise.sim.anesthesia.cases import CaseSpec, run_cases, sample_cases
    from tests.planner.conftest import tiny_run

    config = tmp_path / "planner.yaml"
    save_config(tiny_run().model_copy(update={"closed_loop": ClosedLoopConfig(cases=2, seed=3, modes=("argmax",))}), config)
    run = api.resolve_planner_run(config, tiny_cases_file, epochs=1)
    assert run.train.epochs == 1 and run.data_path == str(tiny_cases_file.resolve())
    lines = []
    planner = api.train_planner_from_file(run, tiny_cases_file, tmp_path / "run", echo=lines.append)
    assert isinstance(planner, PlannerRun) and any("closed loop" in line for line in lines)
    assert set(planner.summary["closed_loop"]["policies"]) == {"planner_argmax", "simulated_anesthesiologist"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["closed_loop"] == planner.summary["closed_loop"]
    # The trained model acts on simulated cases as a policy, and reloads from the run directory.
    spec = CaseSpec(duration_min=(12, 12))
    cohort = sample_cases(2, np.random.default_rng(0), spec)
    model, _ = load_planner(tmp_path / "run")
    traj = run_cases(cohort, PlannerPolicy(model, "argmax"), 1, spec)
    assert traj.rates.shape[1:] == (2, 2) and (traj.rates >= 0).all()


def test_run_kind_reads_the_algorithm_from_the_run_config(trained, tmp_path):
    root, _, _ = trained
    assert api.run_kind(root / "run") == "iql" and api.run_kind(root / "run" / "model.pt") == "iql"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.yaml").write_text("algo: planner\n")
    assert api.run_kind(tmp_path / "p") == "planner"
    (tmp_path / "p" / "config.yaml").write_text("algo: ppo\n")
    with pytest.raises(CheckpointError, match="algo is 'ppo'; expected 'iql' or 'planner'"):
        api.run_kind(tmp_path / "p")
    with pytest.raises(CheckpointError, match="not a run directory"):
        api.run_kind(tmp_path)
