"""MAP-Bayesian dosing in the closed loop: the chart it reads, the limits it acts under, what it achieves,
and that adding it changes nothing for the other policies."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from dosewise import api
from dosewise.algos.bayesian_policy import BayesianDosingPolicy, dosing_records
from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.iql import IQLConfig
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql
from dosewise.cli import app, closed_loop_table
from dosewise.data.loading import load_table
from dosewise.data.transitions import build_transitions
from dosewise.evaluate.vancomycin.closed_loop import evaluate_vancomycin
from dosewise.sim.vancomycin import (
    AUC_TARGET,
    DECISION_HOURS,
    CohortSpec,
    KidneyModel,
    Regimen,
    VancomycinConfig,
    rollout,
    sample_cohort,
)
from dosewise.sim.vancomycin_clinician import VancomycinClinician, simulate_dataset

REGIMEN = Regimen()


class _Recording(BayesianDosingPolicy):
    """The Bayesian policy, keeping a copy of every chart it was handed."""

    def __call__(self, obs, record):
        self.seen = [*getattr(self, "seen", []), copy.deepcopy(record)]
        return super().__call__(obs, record)


def test_the_record_at_each_step_is_what_the_simulator_did_so_far():
    config = VancomycinConfig(cohort=replace(CohortSpec(), missing_prob=0.15))  # uncharted levels and creatinines
    cohort = sample_cohort(25, np.random.default_rng(2), config)
    policy = _Recording(config=config)
    traj = rollout(cohort, policy, seed=4, config=config)
    assert len(policy.seen) == traj.actions.shape[0]
    for t, record in enumerate(policy.seen):
        hour = DECISION_HOURS * (t + 1)
        np.testing.assert_array_equal(record.observation_hours, traj.observation_hours[: t + 1])
        np.testing.assert_array_equal(record.charted, traj.observations[: t + 1])  # as charted, NaN included
        np.testing.assert_array_equal(record.dose_mg, traj.dose_state[t, :, 0])
        records = dosing_records(record)
        for i in np.flatnonzero(t < cohort.steps):
            given = traj.administrations[i][traj.administrations[i][:, 0] < hour]
            np.testing.assert_array_equal(record.administrations[i], given)
            np.testing.assert_array_equal(np.stack([records[i].dose_start_h, records[i].dose_mg, records[i].infusion_h], 1), given)
            levels = traj.observations[: t + 1, i, 0]
            measured = np.isfinite(levels)
            np.testing.assert_array_equal(records[i].sample_h, traj.observation_hours[: t + 1][measured])
            np.testing.assert_array_equal(records[i].level_mg_l, levels[measured])
            creatinine = traj.observations[: t + 1, i, 1]
            creatinine = creatinine[np.isfinite(creatinine)] if np.isfinite(creatinine).any() else [1.0]  # none charted yet: normal
            assert records[i].creatinine == creatinine[-1] and records[i].creatinine_baseline == creatinine[0]
            assert (records[i].age, records[i].weight_kg, records[i].male) == (cohort.age[i], cohort.weight[i], cohort.sex[i] == 1)
    assert np.isnan(traj.observations[:, :, 0]).any()  # some levels were not charted and are left out above
    assert (traj.observations[:, :, 0] == config.pk.lloq_mg_l).any()  # and some reported at the LLOQ stay in, to be censored
    # a patient is re-fitted only when a level or creatinine was charted
    charted = np.isfinite(traj.observations[:, :, :2]).any(axis=2)
    assert policy.fits == cohort.n + charted[1:].sum()


@pytest.fixture(scope="module")
def with_bayesian() -> dict:
    return evaluate_vancomycin(lambda obs: np.zeros(len(obs)), n_patients=300, seed=31, baselines={"bayesian": BayesianDosingPolicy()})


def test_bayesian_dosing_beats_the_clinician_on_300_patients(with_bayesian):
    """Seed 31, 300 patients, through the action space: days with AUC24 in 400-600 clinician 47.5 %, Bayesian
    69.3 % (paired difference +21.8 [17.3, 26.4] points); AKI 9.7 % vs 6.0 %; return 2.44 vs 6.11."""
    result = with_bayesian
    difference = result["bayesian"]["difference"]
    assert difference["auc_in_target_frac"]["ci95"][0] > 0.1, difference
    assert difference["mean_return"]["ci95"][0] > 0, difference
    assert difference["aki_rate"]["mean"] < 0, difference
    # the paired difference vs the (here do-nothing) learned side is baseline - learned
    mine, learned = result["bayesian"]["outcomes"]["mean_return"]["mean"], result["learned"]["mean_return"]["mean"]
    assert result["bayesian"]["difference_vs_learned"]["mean_return"]["mean"] == pytest.approx(mine - learned)
    assert result["bayesian"]["label"] == "Bayesian (action space)"
    json.dumps(result, allow_nan=False)


def test_the_free_regimen_settles_near_auc_500_without_aki():
    """Three days, no kidney injury: the true AUC24 over the last day has median ~500 (seed 8: 508, 96 % of
    50 patients within 400-600), where the nomogram regimen leaves a median of 602 (32 % within)."""
    config = VancomycinConfig(kidney=replace(KidneyModel(), base_hazard_per_step=1e-12, or_auc_over_600=1.0, or_trough_over_20=1.0))
    cohort = replace(sample_cohort(50, np.random.default_rng(8), config), steps=np.full(50, 18))
    traj = rollout(cohort, BayesianDosingPolicy(free_regimen=True, config=config), seed=9, config=config)
    nomogram = rollout(cohort, lambda obs: np.zeros(len(obs)), seed=9, config=config)
    assert not traj.new_aki.any()
    last_day = traj.auc24[-1]
    assert 475 <= np.median(last_day) <= 525, np.median(last_day)
    inside = ((last_day >= AUC_TARGET[0]) & (last_day <= AUC_TARGET[1])).mean()
    nomogram_inside = ((nomogram.auc24[-1] >= AUC_TARGET[0]) & (nomogram.auc24[-1] <= AUC_TARGET[1])).mean()
    assert inside > 0.7 and inside > nomogram_inside + 0.25, (inside, nomogram_inside)


def test_through_the_action_space_the_dose_moves_at_most_50_percent_per_step():
    cohort = sample_cohort(30, np.random.default_rng(3))
    constrained = rollout(cohort, BayesianDosingPolicy(), seed=5)
    free = rollout(cohort, BayesianDosingPolicy(free_regimen=True), seed=5)
    for traj in (constrained, free):
        before = np.concatenate([cohort.dose_mg[None].astype(float), traj.dose_mg[:-1]])
        np.testing.assert_allclose(traj.actions, (traj.dose_mg / before - 1.0) / REGIMEN.max_change, atol=1e-9)
    assert np.abs(constrained.actions).max() <= 1.0
    assert (np.abs(constrained.actions) == 1.0).any()  # the limit binds sometimes
    assert np.abs(free.actions).max() > 1.0  # the free regimen would have moved further
    ratio = constrained.dose_mg[1:] / constrained.dose_mg[:-1]
    assert ratio.min() >= 1 - REGIMEN.max_change - 1e-12 and ratio.max() <= 1 + REGIMEN.max_change + 1e-12


# -- the other policies are untouched ----------------------------------------------------------

# Measured before the Bayesian hooks existed (same code path, same seeds).
CLINICIAN_ROLLOUT_SHA256 = "c61060c4c4b307750382b6298ccd2ae4572f66b5152cf475fb9a0585752e577f"
IQL_ROLLOUT_SHA256 = "4e6b435ffad9e13859ae57f80e504916a9a1358951cd4bba5f197bb2ccaeb654"
IQL_CLOSED_LOOP = {
    "patients": 120,
    "seed": 21,
    "patient_days": 227,
    "learned": {
        "auc_in_target_frac": {"mean": 0.2907488986784141, "ci95": [0.2330508474576271, 0.348027587856559]},
        "aki_rate": {"mean": 0.31666666666666665, "ci95": [0.23333333333333334, 0.4]},
        "mean_return": {"mean": -5.842721386086714, "ci95": [-8.178978513882502, -3.6000916498334172]},
    },
    "clinician": {
        "auc_in_target_frac": {"mean": 0.4581497797356828, "ci95": [0.39484696182516377, 0.5286935336976321]},
        "aki_rate": {"mean": 0.10833333333333334, "ci95": [0.058333333333333334, 0.16666666666666666]},
        "mean_return": {"mean": 2.688039403885468, "ci95": [1.4019415323793822, 3.9403188869646586]},
    },
    "difference": {
        "auc_in_target_frac": {"mean": -0.16740088105726875, "ci95": [-0.23730306876726648, -0.09766899881750106]},
        "aki_rate": {"mean": 0.20833333333333331, "ci95": [0.13333333333333333, 0.2833333333333333]},
        "mean_return": {"mean": -8.530760789972181, "ci95": [-11.091346202770435, -6.199918058858029]},
    },
}


def _digest(traj) -> str:
    h = hashlib.sha256()
    for name in (
        "observations",
        "actions",
        "rewards",
        "auc24",
        "cumulative_auc",
        "concentration",
        "creatinine",
        "new_aki",
        "dose_mg",
        "dose_state",
    ):
        h.update(np.ascontiguousarray(getattr(traj, name)).tobytes())
    for given in traj.administrations:
        h.update(given.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 60-step dose-aware IQL run on 30 simulated patients (deterministic on one thread)."""
    root = tmp_path_factory.mktemp("bayes")
    data = root / "vanco.csv"
    simulate_dataset(30, 4).to_csv(data, index=False)
    run = IQLRunConfig(
        iql=IQLConfig(hidden=(16, 16), batch_size=32), train=TrainConfig(steps=60, seed=0, checkpoint_every=0), data_path=str(data)
    )
    frame, _ = load_table(data, run.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_iql(run, build_transitions(frame, run.data), root / "run", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_the_clinician_and_a_trained_policy_run_bit_identically_to_before(tiny_run):
    model = TrainedIQL.load(tiny_run)
    cohort = sample_cohort(80, np.random.default_rng(5))
    assert _digest(rollout(cohort, VancomycinClinician(cohort, 9), 13)) == CLINICIAN_ROLLOUT_SHA256
    assert _digest(rollout(cohort, model.policy_action, 13)) == IQL_ROLLOUT_SHA256
    assert evaluate_vancomycin(model.policy_action, n_patients=120, seed=21) == IQL_CLOSED_LOOP
    # baselines run after the learned policy and the clinician and leave their results alone
    with_baselines = evaluate_vancomycin(
        model.policy_action, n_patients=120, seed=21, baselines={"full_dose": lambda obs: np.ones(len(obs))}
    )
    assert {key: with_baselines[key] for key in IQL_CLOSED_LOOP} == IQL_CLOSED_LOOP
    assert with_baselines["full_dose"]["label"] == "full_dose" and with_baselines["full_dose"]["difference"]["aki_rate"]["mean"] > 0


def test_the_evaluation_json_and_the_cli_table_have_the_bayesian_rows(tiny_run, tmp_path, with_bayesian):
    evaluation = api.evaluate_iql(tiny_run, patients=20, seed=7)
    loop = json.loads(json.dumps(evaluation.to_dict(), allow_nan=False))["closed_loop"]
    for name in ("bayesian", "bayesian_free"):
        assert set(loop[name]) == {"label", "outcomes", "difference", "difference_vs_learned"}
        for part in ("outcomes", "difference", "difference_vs_learned"):
            assert set(loop[name][part]) == {"auc_in_target_frac", "aki_rate", "mean_return"}
    assert "bayesian" not in api.evaluate_iql(tiny_run, patients=20, seed=7, bayesian=False).closed_loop
    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["evaluate", "--run", str(tiny_run), "--patients", "20", "--seed", "7", "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text())["closed_loop"] == loop
    assert set(loop) >= {"learned", "clinician", "difference", "bayesian", "bayesian_free"}
    for label in ("Bayesian (action space)", "Bayesian (free regimen) - clinician", "learned policy"):
        assert label in cli.output
    console = Console(width=200, record=True)
    console.print(closed_loop_table(with_bayesian))
    text = console.export_text()
    bayes = with_bayesian["bayesian"]["outcomes"]["auc_in_target_frac"]
    assert f"{100 * bayes['mean']:.1f} [{100 * bayes['ci95'][0]:.1f}, {100 * bayes['ci95'][1]:.1f}]" in text
