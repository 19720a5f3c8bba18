"""The dose-aware state and the dosing record of the vancomycin simulator, and its dialysis patients.

A Bayesian dosing method will rebuild each patient's exposure from the written regimen and the
recorded administrations, so both must agree exactly with what the simulator did.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dosewise.data import schema
from dosewise.sim.vancomycin import (
    DECISION_HOURS,
    DOSE_FEATURES,
    FEATURES,
    OBSERVATION_NAMES,
    CohortSpec,
    KidneyModel,
    Regimen,
    VancomycinConfig,
    VancomycinSimulator,
    pk_parameters,
    policy_features,
    rollout,
    sample_cohort,
    transition_matrices,
)
from dosewise.sim.vancomycin_clinician import VancomycinClinician, simulate_dataset

NO_AKI = VancomycinConfig(
    kidney=replace(KidneyModel(), base_hazard_per_step=1e-12, or_auc_over_600=1.0, or_trough_over_20=1.0),
    cohort=replace(CohortSpec(), missing_prob=0.0),
)
NO_DIALYSIS = VancomycinConfig(cohort=replace(CohortSpec(), dialysis_frac=0.0))
DOSE = DOSE_FEATURES.index("dose_mg")
HOURS = DOSE_FEATURES.index("hours_since_dose")


def random_policy(seed: int):
    """Actions on the clinician's 0.05 grid, different every call: the regimen changes often."""
    rng = np.random.default_rng(seed)
    return lambda obs: np.round(rng.uniform(-1.0, 1.0, obs.shape[0]) / 0.05) * 0.05


def mixed_cohort(n: int = 400, seed: int = 3, steps: int | None = None):
    """Default patients with every nomogram interval, dialysis (48 h) included."""
    cohort = sample_cohort(n, np.random.default_rng(seed))
    assert set(np.unique(cohort.interval_h)) == {8, 12, 24, 48}
    return cohort if steps is None else replace(cohort, steps=np.full(n, steps, dtype=np.int64))


def test_the_simulator_and_the_data_schema_name_the_same_state():
    assert FEATURES == schema.FEATURES and DOSE_FEATURES == schema.DOSE_FEATURES
    assert OBSERVATION_NAMES == FEATURES + DOSE_FEATURES


# -- the dose-aware state ----------------------------------------------------------------------


def test_dose_state_is_the_regimen_before_each_decision_and_the_covariates():
    cohort = mixed_cohort(steps=12)
    traj = rollout(cohort, random_policy(0), seed=1)
    state = traj.dose_state
    assert state.shape == (12, cohort.n, len(DOSE_FEATURES)) and np.isfinite(state).all()
    np.testing.assert_array_equal(state[0, :, DOSE], cohort.dose_mg)
    np.testing.assert_array_equal(state[1:, :, DOSE], traj.dose_mg[:-1])  # the next row's dose is the changed regimen
    reg = Regimen()
    expected = np.clip(state[:-1, :, DOSE] * (1.0 + reg.max_change * traj.actions[:-1]), reg.min_dose_mg, reg.max_dose_mg)
    np.testing.assert_allclose(state[1:, :, DOSE], expected, rtol=1e-12)
    covariates = np.stack([cohort.interval_h, cohort.weight, cohort.age, cohort.dialysis], axis=1)
    for t in range(12):
        np.testing.assert_array_equal(state[t][:, [1, 3, 4, 5]], covariates)


def test_hours_since_dose_follows_the_interval_on_the_4_h_grid():
    cohort = mixed_cohort(steps=20)
    traj = rollout(cohort, random_policy(1), seed=2)
    hours = traj.observation_hours[:, None]  # observations at 4, 8, ..., the first dose at hour 0
    interval = cohort.interval_h[None, :]
    since = traj.dose_state[:, :, HOURS]
    # A dose due at the observation hour starts after the observation: the count runs 4 .. interval.
    np.testing.assert_array_equal(since, (hours - 1) % interval + 1)
    assert np.all(since % DECISION_HOURS == 0) and np.all((since > 0) & (since <= interval))
    assert since[0].tolist() == [4.0] * cohort.n
    # The records agree: the latest administration before each observation started `since` hours earlier.
    for i in range(0, cohort.n, 37):
        starts = traj.administrations[i][:, 0]
        latest = np.array([starts[starts < h].max() for h in traj.observation_hours])
        np.testing.assert_array_equal(traj.observation_hours - latest, since[:, i])


def test_the_table_carries_the_regimen_row_to_row():
    frame = simulate_dataset(80, seed=4)
    assert list(frame.columns[9:16]) == [*DOSE_FEATURES, "sex"]
    assert frame[[*DOSE_FEATURES, "sex"]].notna().all().all()
    assert set(frame["sex"]) == {0, 1} and set(frame["dialysis"]) <= {0, 1}
    reg = Regimen()
    for _, course in frame.groupby("patient_id", sort=False):
        dose, action = course["dose_mg"].to_numpy(), course["action"].to_numpy()
        np.testing.assert_allclose(dose[1:], np.clip(dose[:-1] * (1.0 + 0.5 * action[:-1]), reg.min_dose_mg, reg.max_dose_mg), rtol=1e-12)
        interval = course["interval_h"].to_numpy()
        assert len(set(interval)) == 1
        # Row time t is simulator hour t + 4.
        np.testing.assert_array_equal(course["hours_since_dose"], (course["time"] + DECISION_HOURS - 1) % interval + 1)
        assert len(set(course["weight_kg"])) == len(set(course["age"])) == len(set(course["sex"])) == 1


def test_the_table_keeps_its_exact_doses_through_csv(tmp_path):
    import pandas as pd

    frame = simulate_dataset(20, seed=6)
    frame.to_csv(tmp_path / "v.csv", index=False)
    back = pd.read_csv(tmp_path / "v.csv")
    for name in ("dose_mg", "weight_kg", "age"):
        np.testing.assert_array_equal(back[name].to_numpy(), frame[name].to_numpy())


def test_the_dose_aware_columns_draw_nothing_the_charted_ones_stay_the_same():
    """With and without dialysis patients the random draws line up, so every other patient's
    charted values, actions and rewards are identical."""
    with_dialysis = simulate_dataset(300, seed=7)
    without = simulate_dataset(300, seed=7, config=NO_DIALYSIS)
    assert (without["dialysis"] == 0).all() and with_dialysis["dialysis"].any()
    keep = (with_dialysis["dialysis"] == 0).to_numpy()
    columns = ["patient_id", "time", *FEATURES, "action", "reward", "weight_kg", "age", "sex"]
    assert with_dialysis[columns][keep].equals(without[columns][keep])


def test_rollout_hands_each_policy_the_columns_it_names():
    cohort = mixed_cohort(50, steps=8)
    seen: list[np.ndarray] = []

    def dose_only(obs):
        seen.append(obs.copy())
        return np.zeros(obs.shape[0])

    traj = rollout(cohort, dose_only, seed=3, features=("dose_mg", "vanco_level", "dialysis"))
    assert seen[0].shape == (50, 3)
    np.testing.assert_array_equal(seen[0][:, 0], cohort.dose_mg)
    np.testing.assert_array_equal(seen[0][:, 1], traj.observations[0, :, 0])  # no missing values at t=0 here, else LOCF
    np.testing.assert_array_equal(seen[0][:, 2], cohort.dialysis)
    with pytest.raises(ValueError, match="no feature 'dose'; it observes vanco_level, .*dialysis"):
        rollout(cohort, dose_only, seed=3, features=("vanco_level", "dose"))


def test_policies_declare_their_columns_or_get_the_charted_ones():
    class Declares:
        feature_names = ("vanco_level", "dose_mg")

        def act(self, obs):
            assert obs.shape[1] == 2
            return np.zeros(obs.shape[0])

    assert policy_features(Declares().act) == ("vanco_level", "dose_mg")
    assert policy_features(lambda obs: obs[:, 0]) == FEATURES
    cohort = mixed_cohort(50, steps=4)
    assert policy_features(VancomycinClinician(cohort, 0)) == FEATURES
    rollout(cohort, Declares().act, seed=1)  # the assertion inside runs on every step


# -- the dosing record -------------------------------------------------------------------------


def test_administrations_replayed_through_the_pk_model_give_the_simulated_concentrations():
    cohort = mixed_cohort(steps=15)
    traj = rollout(cohort, random_policy(2), seed=4, config=NO_AKI)
    cl, vc, vp, q = pk_parameters(cohort, cohort.creatinine_base)
    phi, gamma = transition_matrices(cl, vc, vp, q, 1.0)
    end = DECISION_HOURS * (15 + 1)
    rate = np.zeros((cohort.n, end))  # infusion rate in each 1 h sub-step
    for i, record in enumerate(traj.administrations):
        for start, amount, duration in record:
            rate[i, int(start) : int(start + duration)] += amount / duration
    x = np.zeros((cohort.n, 3))
    replayed = {}
    for hour in range(end):
        x = np.einsum("nij,nj->ni", phi, x) + gamma * rate[:, hour : hour + 1]
        replayed[hour + 1] = x.copy()
    for t in range(15):  # step t ends at hour 4 (t + 2)
        hour = DECISION_HOURS * (t + 2)
        np.testing.assert_allclose(replayed[hour][:, 0] / vc, traj.concentration[t], rtol=1e-10)
        np.testing.assert_allclose(replayed[hour][:, 2], traj.cumulative_auc[t], rtol=1e-10)


def test_administrations_are_the_loading_dose_then_the_regimen_in_force():
    cohort = mixed_cohort(steps=18)
    traj = rollout(cohort, random_policy(3), seed=5)
    max_rate = Regimen().max_rate_mg_h
    for i, record in enumerate(traj.administrations):
        interval = cohort.interval_h[i]
        np.testing.assert_array_equal(record[:, 0], np.arange(0, DECISION_HOURS * 19, interval))
        assert record[0, 1] == cohort.loading_mg[i]
        # A dose starting at hour h gets the regimen set by the decision observed at h (or before it).
        step = (record[1:, 0] // DECISION_HOURS - 1).astype(int)
        np.testing.assert_array_equal(record[1:, 1], traj.dose_mg[step, i])
        np.testing.assert_array_equal(record[:, 2], np.ceil(record[:, 1] / max_rate))


def test_administrations_end_with_each_course_and_the_simulator_keeps_them_all():
    cohort = sample_cohort(60, np.random.default_rng(8))
    sim = VancomycinSimulator(cohort, seed=1)
    sim.reset()
    assert [r.tolist() for r in sim.administrations()] == [
        [[0.0, cohort.loading_mg[i], np.ceil(cohort.loading_mg[i] / 1000.0)]] for i in range(60)
    ]
    traj = rollout(cohort, random_policy(4), seed=1)
    for i, record in enumerate(traj.administrations):
        assert record[:, 0].max() < DECISION_HOURS * (cohort.steps[i] + 1)
        assert record.shape[1] == 3 and record.dtype == np.float64
    sim.reset()  # a reset starts a new record
    assert all(len(r) == 1 for r in sim.administrations())


# -- dialysis patients -------------------------------------------------------------------------


def test_a_few_percent_of_the_default_cohort_is_on_dialysis_and_nothing_else_moves():
    n = 20000
    cohort = sample_cohort(n, np.random.default_rng(11))
    assert cohort.dialysis.mean() == pytest.approx(0.04, abs=0.005)
    plain = sample_cohort(n, np.random.default_rng(11), NO_DIALYSIS)
    assert not plain.dialysis.any()
    for name in ("age", "sex", "weight", "serious", "eta_cl", "eta_vc", "eta_vp", "severity0", "sbp_base", "hr_base", "steps"):
        np.testing.assert_array_equal(getattr(cohort, name), getattr(plain, name), err_msg=name)
    off = cohort.dialysis == 0
    for name in ("creatinine_base", "interval_h", "dose_mg", "loading_mg"):
        np.testing.assert_array_equal(getattr(cohort, name)[off], getattr(plain, name)[off], err_msg=name)


def test_dialysis_patients_get_the_dialysis_regimen_and_their_own_pk():
    cohort = sample_cohort(5000, np.random.default_rng(12))
    on = cohort.dialysis == 1
    assert on.sum() > 100
    assert np.all(cohort.interval_h[on] == 48) and np.all(cohort.interval_h[~on] <= 24)
    round_250 = lambda mg: np.maximum(250.0, np.round(mg / 250.0) * 250.0)
    np.testing.assert_array_equal(cohort.dose_mg[on], round_250(7.5 * cohort.weight[on]))
    np.testing.assert_array_equal(cohort.loading_mg[on], np.minimum(round_250(25.0 * cohort.weight[on]), 3000.0))
    assert np.all((cohort.creatinine_base[on] >= 3.0) & (cohort.creatinine_base[on] <= 12.0))
    cl, vc, _, _ = pk_parameters(cohort, cohort.creatinine_base)
    assert np.median(cl[on]) < 1.0 < 2.5 < np.median(cl[~on])
    # The flag itself: the same patient off dialysis clears faster and has a larger central volume.
    flipped = replace(cohort, dialysis=np.zeros_like(cohort.dialysis))
    cl_off, vc_off, _, _ = pk_parameters(flipped, cohort.creatinine_base)
    np.testing.assert_allclose(cl[on], 0.7 * cl_off[on], rtol=1e-12)
    np.testing.assert_allclose(vc[on], 0.5 * vc_off[on], rtol=1e-12)
    # At steady state the dialysis regimen puts the typical patient near the AUC target.
    auc24_steady = cohort.dose_mg[on] * 24.0 / 48.0 / cl[on]
    assert 350.0 < np.median(auc24_steady) < 650.0


def test_dialysis_patients_have_no_kidney_injury_to_get():
    cohort = sample_cohort(2000, np.random.default_rng(13))
    on = cohort.dialysis == 1
    traj = rollout(cohort, lambda obs: np.ones(obs.shape[0]), seed=6)  # reckless: AKI in most others
    assert (traj.new_aki & traj.mask).any(axis=0)[~on].mean() > 0.3
    assert not traj.new_aki[:, on].any()
    np.testing.assert_array_equal(traj.creatinine[:, on], np.broadcast_to(cohort.creatinine_base[on], (traj.creatinine.shape[0], on.sum())))
