"""Kidney injury, infection, reward and the simulator loop of the vancomycin ground truth.

Randomness is pre-drawn per cohort from the seed, so per-patient comparisons below only use
the noise-free quantities (true concentration, AUC, creatinine, severity) with AKI switched off.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dosewise.sim.vancomycin import (
    AUC_TARGET,
    FEATURES,
    NORMAL_VALUES,
    Cohort,
    CohortSpec,
    KidneyModel,
    RewardWeights,
    VancomycinConfig,
    VancomycinSimulator,
    aki_hazard,
    fill_forward,
    kdigo_aki,
    pk_parameters,
    rollout,
    sample_cohort,
    step_reward,
)

NO_AKI = VancomycinConfig(
    kidney=replace(KidneyModel(), base_hazard_per_step=1e-12, or_auc_over_600=1.0, or_trough_over_20=1.0),
    cohort=replace(CohortSpec(), missing_prob=0.0),
)


def constant_policy(value: float):
    return lambda obs: np.full(obs.shape[0], value)


def cohort_of(n: int, seed: int, config: VancomycinConfig = VancomycinConfig(), steps: int | None = None) -> Cohort:
    cohort = sample_cohort(n, np.random.default_rng(seed), config)
    if steps is not None:
        cohort = replace(cohort, steps=np.full(n, steps, dtype=np.int64))
    return cohort


# -- AKI hazard --------------------------------------------------------------------------------


def test_aki_hazard_monotone_and_a_probability():
    auc = np.linspace(0.0, 1500.0, 151)
    trough = np.linspace(0.0, 40.0, 81)
    h = aki_hazard(auc[:, None], trough[None, :])
    assert h.shape == (151, 81)
    assert np.all(np.diff(h, axis=0) >= 0.0), "hazard must not fall with AUC24"
    assert np.all(np.diff(h, axis=1) >= 0.0), "hazard must not fall with the trough"
    assert np.all((h > 0.0) & (h < 1.0))
    # Far below both thresholds the hazard is the base hazard.
    assert h[0, 0] == pytest.approx(1.0 - np.exp(-0.003), rel=1e-3)
    # Absurd exposures saturate but never exceed a probability.
    extreme = aki_hazard(np.array([3000.0, 1e5]), np.array([80.0, 500.0]))
    assert np.all(extreme <= 1.0) and np.all(extreme > 0.99)


def test_aki_hazard_ratios_match_published_odds_ratios():
    low_trough = np.array([10.0])
    auc_ratio = aki_hazard(np.array([700.0]), low_trough) / aki_hazard(np.array([400.0]), low_trough)
    assert auc_ratio[0] >= 2.1
    assert auc_ratio[0] == pytest.approx(2.10**1.482, rel=0.01)  # ramp(1) - ramp(-3) = 1.482
    trough_ratio = aki_hazard(np.array([400.0]), np.array([25.0])) / aki_hazard(np.array([400.0]), np.array([15.0]))
    assert trough_ratio[0] >= 2.39
    assert trough_ratio[0] == pytest.approx(2.39**1.464, rel=0.01)  # ramp(1) - ramp(-1)
    # Inside the target the AUC term is nearly inert: AUC 500 vs 400 changes the hazard < 5 %.
    within = aki_hazard(np.array([500.0]), low_trough) / aki_hazard(np.array([400.0]), low_trough)
    assert 1.0 < within[0] < 1.05


# -- reward ------------------------------------------------------------------------------------


def test_step_reward_hand_picked_values():
    auc = np.array([500.0, 400.0, 600.0, 300.0, 0.0, 900.0, 1200.0, 1800.0, 500.0, 300.0, 399.0, 601.0])
    aki = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    expected = [1.0, 1.0, 1.0, -0.25, -1.0, -0.75, -1.5, -3.0, -9.0, -10.25, -1.0 / 400.0, -1.5 / 600.0]
    np.testing.assert_allclose(step_reward(auc, aki), expected, rtol=1e-12, atol=1e-15)
    assert AUC_TARGET == (400.0, 600.0)


def test_step_reward_weights_are_used():
    w = RewardWeights(in_target=2.0, under=0.5, over=3.0, aki=4.0)
    got = step_reward(np.array([450.0, 200.0, 1200.0, 450.0]), np.array([0, 0, 0, 1], dtype=bool), w)
    np.testing.assert_allclose(got, [2.0, -0.25, -3.0, -2.0])


# -- simulator: vectorisation, determinism, common random numbers -------------------------------


def _run_fixed_actions(cohort: Cohort, actions: np.ndarray, seed: int, config: VancomycinConfig):
    """Step the simulator with a fixed [T, N] action table; returns the StepInfo fields stacked [T, N]."""
    sim = VancomycinSimulator(cohort, seed, config)
    first = sim.reset()
    rows = []
    for a in actions:
        _, info = sim.step(a)
        rows.append(info)
    fields = ("reward", "auc24", "concentration", "trough", "creatinine", "severity", "new_aki", "dose_mg")
    return first, {f: np.stack([getattr(r, f) for r in rows]) for f in fields}


def test_vectorised_cohort_equals_one_patient_at_a_time():
    n, t = 6, 12
    cohort = cohort_of(n, seed=3, config=NO_AKI, steps=t)
    actions = np.round(np.random.default_rng(4).uniform(-1.0, 1.0, (t, n)), 2)
    _, together = _run_fixed_actions(cohort, actions, seed=11, config=NO_AKI)
    assert not together["new_aki"].any()
    for i in range(n):
        _, alone = _run_fixed_actions(cohort.subset([i]), actions[:, [i]], seed=11, config=NO_AKI)
        for name in ("auc24", "concentration", "trough", "creatinine", "severity", "dose_mg", "reward"):
            np.testing.assert_allclose(alone[name][:, 0], together[name][:, i], rtol=1e-12, atol=1e-12, err_msg=f"{name}, patient {i}")
    # Without AKI the true creatinine never moves from baseline.
    np.testing.assert_array_equal(together["creatinine"], np.broadcast_to(cohort.creatinine_base, (t, n)))


def test_same_seed_same_trajectories_other_seed_other_noise():
    cohort = cohort_of(40, seed=5)
    policy = lambda obs: np.clip((15.0 - obs[:, 0]) / 10.0, -1.0, 1.0)
    a = rollout(cohort, policy, seed=9)
    b = rollout(cohort, policy, seed=9)
    for name in ("observations", "actions", "rewards", "auc24", "cumulative_auc", "concentration", "creatinine", "new_aki", "dose_mg"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    c = rollout(cohort, policy, seed=10)
    assert not np.allclose(a.observations[0], c.observations[0], equal_nan=True)
    # The truth before any decision does not depend on the noise seed.
    sim_a, sim_c = VancomycinSimulator(cohort, 9), VancomycinSimulator(cohort, 10)
    np.testing.assert_array_equal(sim_a.concentration, sim_c.concentration)


def test_common_random_numbers_across_policies():
    cohort = cohort_of(60, seed=6)
    up = rollout(cohort, constant_policy(1.0), seed=21)
    down = rollout(cohort, constant_policy(-1.0), seed=21)
    # Same first charted row (no decision has been made yet) ...
    np.testing.assert_array_equal(up.observations[0], down.observations[0])
    # ... the same missing-value pattern at every step ...
    np.testing.assert_array_equal(np.isnan(up.observations), np.isnan(down.observations))
    # ... and the same relative creatinine measurement error although the regimens differ
    # (row t+1 charts the true creatinine at the end of step t with 5 % multiplicative noise).
    rel_up = up.observations[1:, :, 1] / up.creatinine[:-1]
    rel_down = down.observations[1:, :, 1] / down.creatinine[:-1]
    ok = ~np.isnan(rel_up)
    np.testing.assert_allclose(rel_up[ok], rel_down[ok], rtol=1e-12)
    assert not np.allclose(up.concentration[-1], down.concentration[-1])


# -- exposure and outcomes ---------------------------------------------------------------------


def test_higher_doses_give_higher_auc_for_every_patient():
    cohort = cohort_of(50, seed=7, steps=10)
    up = rollout(cohort, constant_policy(1.0), seed=1, config=NO_AKI)
    down = rollout(cohort, constant_policy(-1.0), seed=1, config=NO_AKI)
    keep = rollout(cohort, constant_policy(0.0), seed=1, config=NO_AKI)
    # Every patient gets a maintenance dose within the 44 h, except on dialysis (next dose at 48 h).
    dosed = cohort.interval_h < 44
    assert dosed.sum() >= 45 and (~dosed).sum() >= 1
    assert np.all(up.auc24[-1, dosed] > keep.auc24[-1, dosed])
    assert np.all(keep.auc24[-1, dosed] > down.auc24[-1, dosed])
    assert np.all(up.auc24[-1, dosed] > 3.0 * down.auc24[-1, dosed])
    assert np.all(up.cumulative_auc[-1, dosed] > down.cumulative_auc[-1, dosed])
    # Until the next administration the decisions change nothing.
    np.testing.assert_array_equal(up.cumulative_auc[:, ~dosed], keep.cumulative_auc[:, ~dosed])


def test_dose_mapping_and_clipping():
    cohort = cohort_of(30, seed=8, steps=10)
    up = rollout(cohort, constant_policy(1.0), seed=2, config=NO_AKI)
    down = rollout(cohort, constant_policy(-1.0), seed=2, config=NO_AKI)
    k = np.arange(1, 11)[:, None]
    np.testing.assert_allclose(up.dose_mg, np.minimum(cohort.dose_mg * 1.5**k, 4000.0), rtol=1e-12)
    np.testing.assert_allclose(down.dose_mg, np.maximum(cohort.dose_mg * 0.5**k, 125.0), rtol=1e-12)
    keep = rollout(cohort, constant_policy(0.0), seed=2, config=NO_AKI)
    np.testing.assert_array_equal(keep.dose_mg, np.broadcast_to(cohort.dose_mg, keep.dose_mg.shape))
    # Out-of-range actions are clipped before they are applied and recorded.
    wild = rollout(cohort, constant_policy(7.0), seed=2, config=NO_AKI)
    np.testing.assert_array_equal(wild.actions, 1.0)
    np.testing.assert_array_equal(wild.dose_mg, up.dose_mg)


def test_rolling_auc24_and_reward_consistency():
    cohort = cohort_of(25, seed=9, steps=14)
    traj = rollout(cohort, constant_policy(0.0), seed=3)
    cum = traj.cumulative_auc
    # Step t ends at hour 4 (t + 2); from t = 6 on, AUC24 is the cumulative AUC over the last 6 steps.
    np.testing.assert_allclose(traj.auc24[6:], cum[6:] - cum[:-6], rtol=1e-9)
    assert np.all(np.diff(cum, axis=0) > 0.0)
    np.testing.assert_allclose(traj.rewards, step_reward(traj.auc24, traj.new_aki), rtol=1e-12)


def test_exposure_drives_aki():
    cohort = cohort_of(500, seed=10)
    huge = rollout(cohort, constant_policy(1.0), seed=4)
    low = rollout(cohort, constant_policy(-1.0), seed=4)
    rate_huge = (huge.new_aki & huge.mask).any(axis=0).mean()
    rate_low = (low.new_aki & low.mask).any(axis=0).mean()
    assert rate_huge > 0.5
    assert rate_low < 0.15
    assert rate_huge > 5.0 * rate_low
    # At most one injury per patient.
    assert huge.new_aki.sum(axis=0).max() <= 1


def test_aki_raises_creatinine_with_a_lag():
    cohort = cohort_of(300, seed=11, steps=16)
    traj = rollout(cohort, constant_policy(1.0), seed=5)
    onset = np.argmax(traj.new_aki, axis=0)
    injured = traj.new_aki.any(axis=0) & (onset <= 16 - 4)
    assert injured.sum() >= 50
    idx = np.nonzero(injured)[0]
    base = cohort.creatinine_base[idx]
    # The step of onset ends right after the draw: creatinine has not yet moved.
    np.testing.assert_allclose(traj.creatinine[onset[idx], idx], base, rtol=1e-12)
    # 12 h later (lag 12 h, GFR x U(0.4, 0.7) recovering over 72 h) it is clearly up.
    later = traj.creatinine[onset[idx] + 3, idx] / base
    assert np.all(later > 1.1) and np.all(later < 2.5)
    assert kdigo_aki(traj.creatinine[:, idx], base).mean() > 0.5
    # Never injured: creatinine stays exactly at baseline.
    never = ~traj.new_aki.any(axis=0)
    np.testing.assert_array_equal(traj.creatinine[:, never], np.broadcast_to(cohort.creatinine_base[never], (16, never.sum())))


def test_kdigo_criterion():
    base = np.array([1.0, 0.5, 2.0, 1.0])
    creat = np.array([[1.0, 0.5, 2.0, 1.0], [1.2, 0.76, 2.2, 1.29], [1.31, 0.6, 2.31, 1.1]])
    # Rise >= 0.3 (patients 0, 2), >= 1.5x baseline (patient 1 at 0.76); patient 3 peaks at +0.29.
    np.testing.assert_array_equal(kdigo_aki(creat, base), [True, True, True, False])


def _steady_cohort(dose: float, loading: float) -> Cohort:
    """Two typical patients (CL 4.5 L/h, q8h) so that AUC24 ~ 3 * dose / 4.5."""
    n = 1
    return Cohort(
        age=np.full(n, 40.0),
        sex=np.ones(n, dtype=np.int64),
        weight=np.full(n, 70.0),
        creatinine_base=np.full(n, 7000.0 / 8640.0),
        dialysis=np.zeros(n, dtype=np.int64),
        serious=np.zeros(n, dtype=bool),
        eta_cl=np.zeros(n),
        eta_vc=np.zeros(n),
        eta_vp=np.zeros(n),
        severity0=np.full(n, 0.8),
        sbp_base=np.full(n, 128.0),
        hr_base=np.full(n, 78.0),
        interval_h=np.full(n, 8, dtype=np.int64),
        dose_mg=np.full(n, dose),
        loading_mg=np.full(n, loading),
        steps=np.full(n, 12, dtype=np.int64),
    )


def test_infection_resolves_faster_with_target_exposure():
    high = _steady_cohort(750.0, 2000.0)
    low = _steady_cohort(225.0, 600.0)
    assert pk_parameters(high, high.creatinine_base)[0][0] == pytest.approx(4.5)
    _, on_target = _run_fixed_actions(high, np.zeros((12, 1)), seed=0, config=NO_AKI)
    _, under = _run_fixed_actions(low, np.zeros((12, 1)), seed=0, config=NO_AKI)
    # Exposures: ~400-500 vs ~130-150 mg*h/L over the whole run.
    assert np.all((on_target["auc24"] > 400.0) & (on_target["auc24"] < 520.0))
    assert np.all((under["auc24"] > 120.0) & (under["auc24"] < 160.0))
    s_hi, s_lo = on_target["severity"][:, 0], under["severity"][:, 0]
    # Step 4 ends at 24 h, step 10 at 48 h: severity about halves in a day at AUC ~ 450 ...
    assert s_hi[10] / s_hi[4] < 0.6
    assert np.all(np.diff(s_hi) < 0.0)
    # ... and keeps growing under-dosed.
    assert np.all(np.diff(s_lo) > 0.0)
    assert s_lo[-1] > 0.9 and s_hi[-1] < 0.25


def test_severity_shows_in_the_vital_signs():
    cohort = cohort_of(400, seed=12, steps=12)
    traj = rollout(cohort, constant_policy(0.0), seed=6)
    sim = VancomycinSimulator(cohort, 6)
    # WBC is 6 + 14 S + N(0, 1): at t = 0 its mean tracks the true severity.
    wbc = traj.observations[0, :, FEATURES.index("wbc")]
    ok = ~np.isnan(wbc)
    resid = wbc[ok] - (6.0 + 14.0 * sim.severity[ok])
    assert abs(resid.mean()) < 0.2 and 0.85 < resid.std() < 1.15


# -- rollout -----------------------------------------------------------------------------------


def test_rollout_shapes_and_mask():
    cohort = cohort_of(20, seed=13)
    traj = rollout(cohort, constant_policy(0.0), seed=7)
    t_max = int(cohort.steps.max())
    for name in ("actions", "rewards", "auc24", "cumulative_auc", "concentration", "creatinine", "new_aki", "dose_mg"):
        assert getattr(traj, name).shape == (t_max, 20), name
    assert traj.observations.shape == (t_max, 20, len(FEATURES))
    assert traj.new_aki.dtype == bool
    np.testing.assert_array_equal(traj.mask.sum(axis=0), cohort.steps)
    np.testing.assert_array_equal(traj.steps, cohort.steps)
    # The mask is a prefix: real steps first, padding after.
    assert np.all(traj.mask[:-1] >= traj.mask[1:])
    assert np.all((cohort.steps >= 8) & (cohort.steps <= 20))


def test_rollout_policy_never_sees_missing_values():
    config = VancomycinConfig(cohort=replace(CohortSpec(), missing_prob=0.6))
    cohort = cohort_of(30, seed=14, config=config)
    seen: list[np.ndarray] = []

    def policy(obs):
        seen.append(obs.copy())
        return np.zeros(obs.shape[0])

    traj = rollout(cohort, policy, seed=8, config=config)
    seen_arr = np.stack(seen)
    assert not np.isnan(seen_arr).any()
    raw = traj.observations
    assert 0.5 < np.isnan(raw).mean() < 0.7
    # Charted values pass through; a missing first value is the normal value; later ones carry forward.
    np.testing.assert_array_equal(seen_arr[~np.isnan(raw)], raw[~np.isnan(raw)])
    first_missing = np.isnan(raw[0])
    np.testing.assert_array_equal(seen_arr[0][first_missing], np.broadcast_to(NORMAL_VALUES, raw[0].shape)[first_missing])
    later_missing = np.isnan(raw[1:])
    np.testing.assert_array_equal(seen_arr[1:][later_missing], seen_arr[:-1][later_missing])


def test_fill_forward():
    last = np.array([[1.0, 2.0], [3.0, 4.0]])
    obs = np.array([[np.nan, 5.0], [6.0, np.nan]])
    np.testing.assert_array_equal(fill_forward(obs, last), [[1.0, 5.0], [6.0, 4.0]])


def test_observations_are_physiological():
    cohort = cohort_of(200, seed=15)
    traj = rollout(cohort, constant_policy(0.0), seed=9)
    obs = traj.observations[traj.mask]
    lo = np.array([2.0, 0.1, 0.5, 2.0, 35.0, 50.0, 40.0])
    hi = np.array([150.0, 15.0, 30.0, 200.0, 40.0, 200.0, 160.0])  # creatinine, BUN: up to ESRD values on dialysis
    ok = ~np.isnan(obs)
    assert np.all((obs >= lo) | ~ok) and np.all((obs <= hi) | ~ok)
    # The level is floored at the assay's LLOQ (2 mg/L).
    assert np.nanmin(obs[:, 0]) >= 2.0
