"""Model-based OPE on patient twins: close to the truth where the model holds, "not estimable" where it is not trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dosewise.algos.bayesian_dosing import omegas
from dosewise.data import DataConfig, load_table
from dosewise.data.transitions import build_transitions
from dosewise.evaluate.vancomycin.off_policy import OffPolicyEvaluator
from dosewise.evaluate.vancomycin.ope import OPEConfig, vancomycin_true_value
from dosewise.evaluate.vancomycin.twins import PatientTwins, TwinConfig, TwinEvaluator
from dosewise.sim.vancomycin_clinician import simulate_dataset

GAMMA = 0.9


def proportional(obs: np.ndarray) -> np.ndarray:
    return np.clip(-0.03 * (obs[:, 0] - 14.0), -1.0, 1.0)


def always_raise(obs: np.ndarray) -> np.ndarray:
    return np.full(obs.shape[0], 0.6)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("twins") / "courses.csv"
    simulate_dataset(300, 7).to_csv(path, index=False)
    frame, _ = load_table(path, DataConfig())
    return path, frame


@pytest.fixture(scope="module")
def evaluator(table):
    _, frame = table
    return TwinEvaluator(PatientTwins.fit(frame, DataConfig(), TwinConfig(draws=6), seed=0), GAMMA, seed=0)


def test_the_twins_spread_like_the_population(evaluator):
    cohort = evaluator.twins.cohort
    assert cohort.n == 300 * 6
    spread = np.array([cohort.eta_cl.std(), cohort.eta_vc.std(), cohort.eta_vp.std()])
    # Posterior draws put back the between-patient spread that MAP point estimates shrink away.
    np.testing.assert_allclose(spread, omegas(), rtol=0.25)


def test_a_sensible_policy_is_valued_within_its_interval_of_the_truth(evaluator):
    result = evaluator.value(proportional)
    truth = vancomycin_true_value(proportional, GAMMA, 4000, 1000)["mean"]
    assert result["not_estimable"] is None
    low, high = result["ci95"]
    assert low <= truth <= high and high - low < 1.5
    assert abs(result["estimate"] - truth) < 0.4
    assert evaluator.model_check["ok"] and abs(evaluator.model_check["gap"]) < 0.5


def test_a_policy_beyond_the_logged_exposures_is_not_estimable(evaluator):
    result = evaluator.value(always_raise)
    assert result["estimate"] is None and result["ci95"] is None
    assert "AUC24" in result["not_estimable"] and result["outside_support"] > 0.2
    json.dumps(result, allow_nan=False)


def test_a_model_that_does_not_reproduce_the_logged_courses_is_not_trusted(table):
    _, frame = table
    wrong = frame.assign(reward=frame["reward"] + 1.0)  # rewards the patient model cannot produce
    judged = TwinEvaluator(PatientTwins.fit(wrong, DataConfig(), TwinConfig(draws=2), seed=0), GAMMA, seed=0)
    assert not judged.model_check["ok"]
    assert "does not reproduce the logged courses" in judged.value(proportional)["not_estimable"]


def test_without_the_dose_columns_nothing_is_trusted(table):
    path, frame = table
    seed_format = frame.drop(
        columns=["dose_mg", "interval_h", "hours_since_dose", "weight_kg", "age", "dialysis", "sex", "loading_dose_mg"]
    )
    config = DataConfig(optional_features=())
    quick = OPEConfig(fqe_steps=200, fqe_bootstrap=2, behaviour_steps=100, n_bootstrap=50)
    judge = OffPolicyEvaluator(seed_format, build_transitions(seed_format, config), GAMMA, config, ope_config=quick, source=str(path))
    result = judge.evaluate(proportional)
    twins = result["estimators"]["twins"]
    assert twins["estimate"] is None and "dose_mg" in twins["not_estimable"] and "sex" in twins["not_estimable"]
    assert result["trusted"] is None and result["why"].startswith("no estimator is trusted")
    assert result["behaviour"]["ci95"][0] <= result["behaviour"]["mean"] <= result["behaviour"]["ci95"][1]
    json.dumps(result, allow_nan=False)
