import numpy as np
import pytest

from dosewise.evaluate.stats import bootstrap_indices
from dosewise.evaluate.vancomycin.closed_loop import (
    PatientOutcomes,
    evaluate_vancomycin,
    summarize,
)
from dosewise.sim.vancomycin import OBSERVATION_NAMES, Trajectories


def _trajectories(daily_aucs, steps, rewards=None, aki=None):
    """Hand-made rollout of N patients whose AUC per day is given ([D, N])."""
    daily = np.asarray(daily_aucs, dtype=float)
    t, n = 6 * daily.shape[0], daily.shape[1]
    hourly = np.repeat(daily / 6.0, 6, axis=0)  # AUC per 4 h step
    zeros = np.zeros((t, n))
    return Trajectories(
        observations=np.zeros((t, n, 7)),
        actions=zeros,
        rewards=zeros + 1.0 if rewards is None else rewards,
        auc24=zeros,
        cumulative_auc=np.cumsum(hourly, axis=0),
        concentration=zeros,
        creatinine=zeros,
        new_aki=np.zeros((t, n), bool) if aki is None else aki,
        dose_mg=zeros,
        steps=np.asarray(steps),
    )


def test_patient_days_count_only_complete_days_within_each_course():
    # patient 0: 3 days (500 in, 700 out, 450 in); patient 1: 2 complete days + 4 h (300 out, 550 in).
    traj = _trajectories([[500, 300], [700, 550], [450, 9999]], steps=[18, 13])
    out = PatientOutcomes.from_trajectories(traj)
    np.testing.assert_array_equal(out.days, [3, 2])
    np.testing.assert_array_equal(out.days_in_target, [2, 1])
    np.testing.assert_array_equal(out.total_return, [18.0, 13.0])  # padding steps are not counted


def test_aki_counts_only_within_the_course():
    aki = np.zeros((12, 2), bool)
    aki[3, 0] = True
    aki[11, 1] = True  # after patient 1's course ended
    out = PatientOutcomes.from_trajectories(_trajectories([[500, 500], [500, 500]], steps=[12, 8], aki=aki))
    np.testing.assert_array_equal(out.aki, [True, False])


def test_summary_pools_patient_days_and_brackets_the_point_estimate():
    traj = _trajectories([[500, 300, 450, 800]], steps=[6, 6, 6, 6])
    out = PatientOutcomes.from_trajectories(traj)
    summary = summarize(out, bootstrap_indices(4, 500, seed=0))
    assert summary["auc_in_target_frac"]["mean"] == pytest.approx(0.5)
    low, high = summary["auc_in_target_frac"]["ci95"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert summary["mean_return"]["ci95"] == [6.0, 6.0]


def _proportional(gain, target):
    return lambda obs: np.clip(-gain * (obs[:, 0] - target), -1, 1)


def test_a_better_hand_made_controller_beats_the_clinician_and_a_reckless_one_loses():
    good = evaluate_vancomycin(_proportional(0.03, 14.0), n_patients=400, seed=5)
    assert good["difference"]["mean_return"]["ci95"][0] > 0
    assert good["difference"]["auc_in_target_frac"]["mean"] > 0
    reckless = evaluate_vancomycin(lambda obs: np.ones(len(obs)), n_patients=400, seed=5)
    assert reckless["difference"]["aki_rate"]["ci95"][0] > 0
    assert reckless["difference"]["mean_return"]["ci95"][1] < 0
    # same seed: the clinician side is identical whatever the learned side does
    assert good["clinician"] == reckless["clinician"]


def test_evaluation_is_reproducible_and_depends_on_the_seed():
    policy = _proportional(0.02, 12.0)
    a = evaluate_vancomycin(policy, n_patients=60, seed=1)
    assert a == evaluate_vancomycin(policy, n_patients=60, seed=1)
    assert a != evaluate_vancomycin(policy, n_patients=60, seed=2)


class _DoseAwareController:
    """A policy that declares the 13-feature state, as a trained dose-aware model does."""

    feature_names = OBSERVATION_NAMES

    def __init__(self):
        self.widths: set[int] = set()

    def policy_action(self, obs):
        self.widths.add(obs.shape[1])
        return _proportional(0.03, 14.0)(obs)  # the level is column 0 here too


def test_a_13_feature_policy_gets_its_13_columns_and_the_clinician_its_7():
    controller = _DoseAwareController()
    dose_aware = evaluate_vancomycin(controller.policy_action, n_patients=80, seed=5)
    assert controller.widths == {13}
    charted = evaluate_vancomycin(_proportional(0.03, 14.0), n_patients=80, seed=5)
    assert dose_aware == charted  # the same decisions from the same level column, the same clinician


def test_the_columns_can_be_named_explicitly():
    seen = []

    def by_dose(obs):
        seen.append(obs)
        return np.where(obs[:, 0] > 2000.0, -0.5, 0.2)

    result = evaluate_vancomycin(by_dose, n_patients=40, seed=2, features=("dose_mg", "hours_since_dose"))
    assert {o.shape[1] for o in seen} == {2} and set(np.unique(seen[0][:, 1])) == {4.0}
    assert result["clinician"] == evaluate_vancomycin(by_dose, n_patients=40, seed=2, features=("dose_mg", "age"))["clinician"]
    with pytest.raises(ValueError, match="no feature 'dose'"):
        evaluate_vancomycin(by_dose, n_patients=10, seed=2, features=("dose",))
