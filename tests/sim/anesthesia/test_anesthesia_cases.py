import numpy as np
import pytest

from dosewise.sim.anesthesia.cases import (
    MAX_RATE_ML_H,
    CaseSpec,
    case_hemodynamics,
    monitors,
    propofol_mg_s,
    remifentanil_ug_s,
    run_cases,
    sample_cases,
    stimulation,
)
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist, simulate_cases
from dosewise.sim.anesthesia.pid import DualLoopPID

COLUMNS = ["case_id", "time", "BIS", "MAP", "SBP", "DBP", "HR", "PPF20_RATE", "RFTN20_RATE", "age", "sex", "height", "weight", "asa"]
SHORT = CaseSpec(duration_min=(20.0, 40.0))


def constant(ppf, rftn):
    return lambda h: (np.full(h.cohort.n, ppf), np.full(h.cohort.n, rftn))


def test_pump_units():
    # 200 mL/h of 20 mg/mL propofol is 4000 mg/h; 30 mL/h of 20 ug/mL remifentanil is 600 ug/h.
    assert propofol_mg_s(200) == pytest.approx(4000 / 3600)
    assert remifentanil_ug_s(30) == pytest.approx(600 / 3600)


def test_calibrated_propofol_map_emax_is_the_map_of_sap_and_dap():
    cohort = sample_cases(3, np.random.default_rng(0))
    hemo = case_hemodynamics(cohort)
    emax = hemo.emax_propo_dap + (hemo.emax_propo_sap + hemo.emax_propo_dap) / 3.0  # the form PAS uses
    np.testing.assert_allclose(emax, 18.1 + (54.8 - 18.1) / 3.0)
    np.testing.assert_array_equal(hemo.map_base, cohort.map_base)


def test_monitors_split_map_into_sbp_dbp_and_slow_the_heart_with_remifentanil():
    cohort = sample_cases(4, np.random.default_rng(1))
    n = cohort.n
    quiet = monitors(cohort, np.full(n, 50.0), np.full(n, 80.0), np.zeros(n), np.zeros((n, 2)))
    np.testing.assert_allclose(quiet[:, 3] + (quiet[:, 2] - quiet[:, 3]) / 3.0, 80.0)  # MAP = DBP + PP/3
    opioid = monitors(cohort, np.full(n, 50.0), np.full(n, 80.0), np.full(n, 8.0), np.zeros((n, 2)))
    assert (opioid[:, 4] < quiet[:, 4]).all()


def test_stimulation_is_zero_before_the_first_event_and_positive_during_one():
    cohort = sample_cases(5, np.random.default_rng(2))
    assert np.all(stimulation(cohort, 0.0) == 0.0)
    during = stimulation(cohort, float(cohort.event_start_s[0, 0]) + 60.0)
    assert during[0, 0] > 0 and during[0, 1] > 0


def test_runner_shapes_masks_and_common_random_numbers():
    cohort = sample_cases(6, np.random.default_rng(3), SHORT)
    a = run_cases(cohort, constant(30, 20), seed=4, spec=SHORT)
    b = run_cases(cohort, constant(30, 20), seed=4, spec=SHORT)
    np.testing.assert_array_equal(a.vitals, b.vitals)
    steps = cohort.duration_s // SHORT.step_s
    np.testing.assert_array_equal(a.steps, steps)
    assert a.rates.shape == (steps.max(), 6, 2) and a.bis_true.shape == (steps.max() * 60, 6)
    assert a.mask.sum() == steps.sum()
    # Another policy on the same seed starts from the same charted pre-induction vitals.
    c = run_cases(cohort, constant(0, 0), seed=4, spec=SHORT)
    np.testing.assert_array_equal(a.vitals[0], c.vitals[0])
    assert np.all(c.bis_true[a.second_mask] > 90)  # no drug, no hypnosis
    assert a.bis_true[600:][a.second_mask[600:]].mean() < 70


def test_rates_are_clipped_integers():
    cohort = sample_cases(3, np.random.default_rng(5), SHORT)
    traj = run_cases(cohort, constant(500.7, -3), seed=0, spec=SHORT)
    assert traj.rates.dtype == np.int64
    assert np.all(traj.rates[..., 0] == MAX_RATE_ML_H) and np.all(traj.rates[..., 1] == 0)


def test_anesthesiologist_induces_titrates_and_stays_in_pump_range():
    cohort = sample_cases(40, np.random.default_rng(6), SHORT)
    clinician = SimulatedAnesthesiologist(cohort, seed=1)
    traj = run_cases(cohort, clinician, seed=2, spec=SHORT)
    assert np.all(traj.rates[0, :, 0] == MAX_RATE_ML_H)  # induction bolus at the top rate
    assert traj.rates.min() >= 0 and traj.rates.max() <= MAX_RATE_ML_H
    maintenance = traj.rates[5:][traj.mask[5:]]
    assert 5 < np.median(maintenance[:, 0]) < 60  # 20-60 mL/h is ~70-200 ug/kg/min at 70 kg
    assert len(np.unique(maintenance[:, 0])) > 10  # it titrates


def test_pid_keeps_bis_in_band_more_than_the_anesthesiologist():
    from dosewise.evaluate.anesthesia.closed_loop import evaluate_policies

    result = evaluate_policies(
        {"clinician": lambda c: SimulatedAnesthesiologist(c, 1), "pid": DualLoopPID},
        n_cases=30,
        seed=7,
        spec=CaseSpec(duration_min=(40.0, 60.0)),
    )
    clinician, pid = result["policies"]["clinician"], result["policies"]["pid"]
    assert pid["pct_bis_40_60"]["mean"] > clinician["pct_bis_40_60"]["mean"] + 10
    assert 30 < clinician["pct_bis_40_60"]["mean"] < 95
    for metrics in (clinician, pid):
        low, high = metrics["pct_map_below_65"]["ci95"]
        assert low <= metrics["pct_map_below_65"]["mean"] <= high


def test_dataset_columns_and_reproducibility():
    frame = simulate_cases(5, seed=0, spec=SHORT)
    assert list(frame.columns) == COLUMNS
    assert frame.groupby("case_id")["time"].diff().dropna().eq(60).all()
    assert frame[["PPF20_RATE", "RFTN20_RATE"]].isin(range(201)).all().all()
    assert frame.groupby("case_id")[["age", "sex", "height", "weight", "asa"]].nunique().eq(1).all().all()
    assert frame.equals(simulate_cases(5, seed=0, spec=SHORT))
    assert not frame.equals(simulate_cases(5, seed=1, spec=SHORT))


def test_a_clone_continues_exactly_as_the_original():
    from dosewise.sim.anesthesia.cases import CaseRun

    cohort = sample_cases(4, np.random.default_rng(8), SHORT)
    original = CaseRun(cohort, seed=3, spec=SHORT)
    for _ in range(7):
        original.advance(np.full(4, 40), np.full(4, 10))
    branch = original.clone()
    for run in (original, branch):
        for _ in range(4):
            run.advance(np.full(4, 25), np.full(4, 15))
    np.testing.assert_array_equal(original.vitals, branch.vitals)
    np.testing.assert_array_equal(original.bis_true, branch.bis_true)
    # A branch with other rates changes only what comes after the branching point.
    other = CaseRun(cohort, seed=3, spec=SHORT)
    for _ in range(7):
        other.advance(np.full(4, 40), np.full(4, 10))
    other.advance(np.zeros(4), np.zeros(4))
    np.testing.assert_array_equal(other.bis_true[: 7 * 60], original.bis_true[: 7 * 60])
    assert (other.bis_true[8 * 60 - 1] > original.bis_true[8 * 60 - 1]).all()  # no drug for a minute: lighter
    # Fresh monitor noise: the same patients, other charted values.
    noisy = original.clone()
    noisy.reseed(99)
    same = original.clone()
    for run in (noisy, same):
        run.advance(np.full(4, 25), np.full(4, 15))
    np.testing.assert_array_equal(noisy.bis_true, same.bis_true)
    assert not np.array_equal(noisy.vitals[noisy.k], same.vitals[same.k])  # charted after the step


def test_shifted_cohort_is_old_obese_and_more_sensitive():
    from dosewise.sim.anesthesia.cases import SHIFTED_SPEC

    spec = CaseSpec(**{**SHIFTED_SPEC.__dict__, "duration_min": (20.0, 20.0)})
    shifted = sample_cases(200, np.random.default_rng(9), spec)
    cov = shifted.covariates
    assert cov.age.min() >= 70 and cov.age.max() <= 90
    bmi = cov.weight / (cov.height / 100.0) ** 2
    assert bmi.min() >= 30 and bmi.max() <= 40
    # The same patients and doses reach a deeper BIS when more sensitive.
    standard = CaseSpec(**{**spec.__dict__, "pd_sensitivity": 1.0})
    deep = run_cases(shifted, constant(30, 20), seed=1, spec=spec)
    usual = run_cases(shifted, constant(30, 20), seed=1, spec=standard)
    assert deep.bis_true[-60:].mean() < usual.bis_true[-60:].mean() - 3


def test_pump_concentrations_are_the_population_patient_of_the_simulator():
    """The pump's concentrations are the simulator's typical patient (no variability) under the same
    rates, step by step, from a drug-free start."""
    from dosewise.sim.anesthesia import AnesthesiaSimulator
    from dosewise.sim.anesthesia.cases import (
        PUMP_CONCENTRATIONS,
        propofol_mg_s,
        pump_concentrations,
        remifentanil_ug_s,
    )

    rng = np.random.default_rng(3)
    cohort = sample_cases(4, rng)
    rates = rng.integers(0, 201, (4, 6, 2))
    shown = pump_concentrations(cohort.covariates, rates, 60)
    assert shown.shape == (4, 7, len(PUMP_CONCENTRATIONS)) and not shown[:, 0].any()
    sim = AnesthesiaSimulator(cohort.covariates, 1.0)
    for k in range(6):
        for _ in range(60):
            obs = sim.step(propofol_mg_s(rates[:, k, 0]), remifentanil_ug_s(rates[:, k, 1]))
        expected = np.stack([obs.cp_propofol, obs.ce_propofol, obs.cp_remifentanil, obs.ce_remifentanil], axis=1)
        np.testing.assert_allclose(shown[:, k + 1], expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"rates_ml_h must be \[4, T, 2\]"):
        pump_concentrations(cohort.covariates, rates[:2], 60)
