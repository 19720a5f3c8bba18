"""Pharmacokinetics of the vancomycin simulator against hand-derived closed forms.

The two-compartment model with a zero-order infusion into the central compartment has a
textbook biexponential solution; the simulator's matrix-exponential propagators must
reproduce it (and its integral, the AUC) to rounding error, for several patients at once.
"""

from __future__ import annotations

import numpy as np
import pytest

from dosewise.sim.vancomycin import (
    Cohort,
    GotiPK,
    cockcroft_gault,
    pk_parameters,
    transition_matrices,
)

# Columns: CL (L/h), Vc (L), Vp (L), Q (L/h). Typical Goti adult, a slow eliminator with a
# large periphery, a fast eliminator with a small one, a patient on dialysis.
PARAMS = np.array(
    [
        [4.5, 58.4, 38.4, 6.5],
        [1.0, 20.0, 60.0, 10.0],
        [8.0, 100.0, 30.0, 3.0],
        [2.2, 29.2, 45.0, 6.5],
    ]
)


def _split(params: np.ndarray):
    return params[:, 0], params[:, 1], params[:, 2], params[:, 3]


def _macro(cl, vc, vp, q):
    """alpha > beta > 0 with alpha + beta = k10 + k12 + k21 and alpha * beta = k10 * k21."""
    k10, k12, k21 = cl / vc, q / vc, q / vp
    s, p = k10 + k12 + k21, k10 * k21
    root = np.sqrt(s * s - 4.0 * p)
    alpha, beta = (s + root) / 2.0, (s - root) / 2.0
    return k12, k21, alpha, beta


def analytic_infusion(cl, vc, vp, q, rate, t_inf, t):
    """Central amount, peripheral amount and AUC of C = Ac/Vc at time t (scalar) for an infusion of
    ``rate`` mg/h over [0, t_inf], starting from an empty body. All parameters are [N] arrays."""
    k12, k21, alpha, beta = _macro(cl, vc, vp, q)
    # Unit-bolus central amount: a1 exp(-alpha t) + b1 exp(-beta t); peripheral: k12/(alpha-beta) (e^-bt - e^-at).
    a1 = (alpha - k21) / (alpha - beta)
    b1 = (k21 - beta) / (alpha - beta)
    kp = k12 / (alpha - beta)

    def integral(t_end, lam):  # int_0^t_end (1 - exp(-lam s)) / lam ds
        return (t_end - (1.0 - np.exp(-lam * t_end)) / lam) / lam

    if t <= t_inf:
        ea, eb = 1.0 - np.exp(-alpha * t), 1.0 - np.exp(-beta * t)
        ac = rate * (a1 * ea / alpha + b1 * eb / beta)
        ap = rate * kp * (eb / beta - ea / alpha)
        auc = rate / vc * (a1 * integral(t, alpha) + b1 * integral(t, beta))
    else:
        # Decay from the amounts at the end of the infusion, written without cancellation.
        da, db = np.exp(-alpha * (t - t_inf)), np.exp(-beta * (t - t_inf))
        ea, eb = 1.0 - np.exp(-alpha * t_inf), 1.0 - np.exp(-beta * t_inf)
        ac = rate * (a1 * ea * da / alpha + b1 * eb * db / beta)
        ap = rate * kp * (eb * db / beta - ea * da / alpha)
        auc_end = rate / vc * (a1 * integral(t_inf, alpha) + b1 * integral(t_inf, beta))
        auc = auc_end + rate / vc * (a1 * ea * (1.0 - da) / alpha**2 + b1 * eb * (1.0 - db) / beta**2)
    return np.stack([ac, ap, auc], axis=1)


def propagate(params: np.ndarray, rate: float, t_inf: int, hours: int) -> np.ndarray:
    """Hourly states [hours + 1, N, 3] from repeated x <- phi x + gamma u."""
    phi, gamma = transition_matrices(*_split(params), dt=1.0)
    x = np.zeros((params.shape[0], 3))
    states = [x]
    for h in range(hours):
        u = rate if h < t_inf else 0.0
        x = np.einsum("nij,nj->ni", phi, x) + gamma * u
        states.append(x)
    return np.stack(states)


# -- transition matrices ---------------------------------------------------------------------


def test_transition_matrix_shapes_and_structure():
    phi, gamma = transition_matrices(*_split(PARAMS), dt=1.0)
    assert phi.shape == (4, 3, 3) and gamma.shape == (4, 3)
    # The AUC state never feeds back into the amounts, and amounts never go negative.
    np.testing.assert_array_equal(phi[:, :2, 2], 0.0)
    assert phi[:, 2, 2] == pytest.approx(1.0, abs=1e-14)
    assert np.all(phi[:, :2, :2] > 0.0)
    assert np.all(gamma > 0.0)
    # No drug enters the body without an infusion: the zero state stays zero.
    np.testing.assert_array_equal(phi @ np.zeros(3), 0.0)


def test_transition_matrices_form_a_semigroup():
    """Two 1 h steps equal one 2 h step, for the homogeneous and the infusion part."""
    cl, vc, vp, q = _split(PARAMS)
    phi1, gamma1 = transition_matrices(cl, vc, vp, q, dt=1.0)
    phi2, gamma2 = transition_matrices(cl, vc, vp, q, dt=2.0)
    np.testing.assert_allclose(phi1 @ phi1, phi2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", phi1, gamma1) + gamma1, gamma2, rtol=1e-12)


@pytest.mark.parametrize("dose, t_inf", [(1000.0, 1), (2500.0, 3)])
def test_infusion_matches_closed_form_biexponential(dose, t_inf):
    rate = dose / t_inf
    hours = 72
    states = propagate(PARAMS, rate, t_inf, hours)
    for h in range(1, hours + 1):
        expected = analytic_infusion(*_split(PARAMS), rate=rate, t_inf=t_inf, t=float(h))
        np.testing.assert_allclose(states[h], expected, rtol=1e-9, atol=0.0, err_msg=f"hour {h}")
    # Sanity of the closed form itself: the peak central concentration of the typical patient
    # (1 g over 1 h, Vc 58.4 L) is a bit below D / Vc because some drug already left the plasma.
    if t_inf == 1:
        c_peak = states[1, 0, 0] / PARAMS[0, 1]
        assert 15.0 < c_peak < dose / PARAMS[0, 1] == pytest.approx(17.123, abs=1e-3)


def test_auc_to_infinity_equals_dose_over_clearance():
    dose = 1000.0
    states = propagate(PARAMS, dose, 1, 400)
    auc_400 = states[-1, :, 2]
    # The remaining tail is C(400) / beta for the slowest phase; add it to close the integral.
    _, _, _, beta = _macro(*_split(PARAMS))
    tail = states[-1, :, 0] / PARAMS[:, 1] / beta
    np.testing.assert_allclose(auc_400 + tail, dose / PARAMS[:, 0], rtol=1e-6)
    # For the three patients with a beta half-life well under a day, 400 h alone is enough.
    fast = np.log(2) / beta < 30.0
    assert fast.sum() >= 3
    np.testing.assert_allclose(auc_400[fast], dose / PARAMS[fast, 0], rtol=1e-3)


def test_mass_balance():
    """Ac + Ap + CL * AUC is the infused amount at all times (what left the body is CL * int C)."""
    dose, t_inf = 2000.0, 2
    states = propagate(PARAMS, dose / t_inf, t_inf, 96)
    hours = np.arange(97, dtype=float)
    infused = dose / t_inf * np.minimum(hours, t_inf)
    total = states[:, :, 0] + states[:, :, 1] + PARAMS[None, :, 0] * states[:, :, 2]
    np.testing.assert_allclose(total, np.broadcast_to(infused[:, None], total.shape), rtol=1e-10, atol=1e-9)


def test_amount_conserved_without_elimination():
    params = PARAMS.copy()
    params[:, 0] = 1e-12
    dose = 1500.0
    states = propagate(params, dose, 1, 200)
    amount = states[1:, :, 0] + states[1:, :, 1]
    np.testing.assert_allclose(amount, dose, rtol=1e-9)
    # Distribution equilibrium: after a long time the concentrations equalise, Ac/Vc = Ap/Vp.
    np.testing.assert_allclose(states[-1, :, 0] / params[:, 1], states[-1, :, 1] / params[:, 2], rtol=1e-6)
    np.testing.assert_allclose(states[-1, :, 0], dose * params[:, 1] / (params[:, 1] + params[:, 2]), rtol=1e-6)


# -- Cockcroft-Gault ---------------------------------------------------------------------------


def test_cockcroft_gault_hand_computed():
    age = np.array([40.0, 40.0, 50.0])
    weight = np.array([70.0, 70.0, 70.0])
    scr = np.array([1.0, 1.0, 0.6])
    sex = np.array([1, 0, 1])
    crcl = cockcroft_gault(age, weight, scr, sex)
    # (140 - 40) * 70 / 72 = 97.2222; the female factor 0.85 gives 82.6389; (90 * 70) / (72 * 0.6) = 145.833.
    np.testing.assert_allclose(crcl, [7000.0 / 72.0, 0.85 * 7000.0 / 72.0, 6300.0 / 43.2], rtol=1e-12)
    assert crcl[0] == pytest.approx(97.2222, abs=1e-4)
    assert crcl[1] == pytest.approx(82.6389, abs=1e-4)


def test_cockcroft_gault_floors_creatinine_above_60_years():
    # Above 60 years a low SCr is raised to 1 mg/dL; at 60 exactly it is not.
    age = np.array([70.0, 70.0, 60.0])
    weight = np.full(3, 70.0)
    scr = np.array([0.6, 1.4, 0.8])
    crcl = cockcroft_gault(age, weight, scr, np.ones(3, dtype=int))
    np.testing.assert_allclose(crcl, [70.0 * 70.0 / 72.0, 70.0 * 70.0 / (72.0 * 1.4), 80.0 * 70.0 / (72.0 * 0.8)], rtol=1e-12)
    assert crcl[0] == pytest.approx(68.0556, abs=1e-4)


def test_cockcroft_gault_caps_at_150():
    crcl = cockcroft_gault(np.array([25.0, 30.0]), np.array([110.0, 100.0]), np.array([0.5, 0.5]), np.array([1, 0]))
    # Uncapped: 115 * 110 / 36 = 351 and 0.85 * 110 * 100 / 36 = 260; both capped.
    np.testing.assert_array_equal(crcl, [150.0, 150.0])
    assert GotiPK().crcl_cap == 150.0
    # A custom cap is honoured.
    from dataclasses import replace

    capped = cockcroft_gault(np.array([25.0]), np.array([110.0]), np.array([0.5]), np.array([1]), replace(GotiPK(), crcl_cap=200.0))
    assert capped[0] == 200.0


# -- individual PK parameters ------------------------------------------------------------------


def make_cohort(**columns) -> Cohort:
    """A cohort with zero random effects; every column can be overridden with a list."""
    n = len(next(iter(columns.values()))) if columns else 1
    base = dict(
        age=np.full(n, 40.0),
        sex=np.ones(n, dtype=np.int64),
        weight=np.full(n, 70.0),
        creatinine_base=np.full(n, 1.0),
        dialysis=np.zeros(n, dtype=np.int64),
        serious=np.zeros(n, dtype=bool),
        eta_cl=np.zeros(n),
        eta_vc=np.zeros(n),
        eta_vp=np.zeros(n),
        severity0=np.full(n, 0.7),
        sbp_base=np.full(n, 128.0),
        hr_base=np.full(n, 78.0),
        interval_h=np.full(n, 12, dtype=np.int64),
        dose_mg=np.full(n, 1000.0),
        loading_mg=np.full(n, 1000.0),
        steps=np.full(n, 10, dtype=np.int64),
    )
    base.update({k: np.asarray(v) for k, v in columns.items()})
    return Cohort(**base)


# Male, 40 years, 70 kg: CrCL = 100 * 70 / (72 * SCr) = 120 mL/min at SCr = 7000 / 8640.
SCR_AT_CRCL_120 = 7000.0 / 8640.0


def test_pk_parameters_typical_values():
    cohort = make_cohort(weight=[70.0, 91.0, 49.0])
    # Adjust each creatinine so that CrCL is 120 mL/min whatever the weight.
    scr = SCR_AT_CRCL_120 * cohort.weight / 70.0
    cl, vc, vp, q = pk_parameters(cohort, scr)
    np.testing.assert_allclose(cl, 4.5, rtol=1e-12)
    np.testing.assert_allclose(vc, 58.4 * cohort.weight / 70.0, rtol=1e-12)
    np.testing.assert_allclose(vp, 38.4 * cohort.weight / 70.0, rtol=1e-12)
    np.testing.assert_allclose(q, 6.5)
    assert vc[1] == pytest.approx(75.92) and vp[2] == pytest.approx(26.88)


def test_pk_parameters_clearance_follows_crcl_power():
    cohort = make_cohort(age=[40.0, 40.0, 40.0])
    scr = SCR_AT_CRCL_120 * np.array([1.0, 2.0, 4.0])  # CrCL 120, 60, 30
    cl, _, _, _ = pk_parameters(cohort, scr)
    np.testing.assert_allclose(cl, 4.5 * np.array([1.0, 0.5, 0.25]) ** 0.8, rtol=1e-12)
    assert cl[1] == pytest.approx(2.58457, abs=1e-5)
    # The cap: a CrCL of 150 (not the uncapped 243) is what enters the clearance.
    cl_cap, _, _, _ = pk_parameters(cohort, np.full(3, 0.4))
    np.testing.assert_allclose(cl_cap, 4.5 * (150.0 / 120.0) ** 0.8, rtol=1e-12)


def test_pk_parameters_dialysis_factors():
    cohort = make_cohort(dialysis=[0, 1], weight=[70.0, 70.0])
    scr = np.full(2, SCR_AT_CRCL_120)
    cl, vc, vp, q = pk_parameters(cohort, scr)
    assert cl[1] / cl[0] == pytest.approx(0.7)
    assert vc[1] / vc[0] == pytest.approx(0.5)
    assert vp[1] == pytest.approx(vp[0]) and q[1] == q[0]
    np.testing.assert_allclose([cl[1], vc[1]], [3.15, 29.2])


def test_pk_parameters_random_effects_are_log_normal_multipliers():
    cohort = make_cohort(eta_cl=[0.0, 0.3], eta_vc=[0.0, -0.5], eta_vp=[0.0, 0.2])
    cl, vc, vp, _ = pk_parameters(cohort, np.full(2, SCR_AT_CRCL_120))
    np.testing.assert_allclose([cl[1] / cl[0], vc[1] / vc[0], vp[1] / vp[0]], np.exp([0.3, -0.5, 0.2]), rtol=1e-12)


# -- the simulator's dosing schedule -----------------------------------------------------------


def test_simulator_concentrations_match_superposed_closed_forms():
    """With the regimen held (action 0) and no kidney injury, PK is constant and every charted
    truth is a sum of closed-form infusions: a loading dose at hour 0, maintenance doses every
    interval, each infused at <= 1000 mg/h over whole hours; the first row is at hour 4."""
    from dataclasses import replace

    from dosewise.sim.vancomycin import (
        CohortSpec,
        KidneyModel,
        VancomycinConfig,
        VancomycinSimulator,
    )

    config = VancomycinConfig(
        kidney=replace(KidneyModel(), base_hazard_per_step=1e-12, or_auc_over_600=1.0, or_trough_over_20=1.0),
        cohort=replace(CohortSpec(), missing_prob=0.0),
    )
    cohort = make_cohort(
        age=[40.0, 55.0, 75.0, 60.0],
        weight=[70.0, 90.0, 60.0, 80.0],
        creatinine_base=[SCR_AT_CRCL_120, 0.9, 1.5, 4.0],
        dialysis=[0, 0, 0, 1],
        eta_cl=[0.0, 0.3, -0.2, 0.1],
        eta_vc=[0.0, -0.4, 0.2, 0.0],
        eta_vp=[0.0, 0.1, 0.5, -0.3],
        interval_h=[8, 12, 24, 24],
        dose_mg=[1000.0, 1250.0, 750.0, 500.0],
        loading_mg=[2000.0, 3000.0, 750.0, 1500.0],
        steps=[12, 12, 12, 12],
    )
    cl, vc, vp, q = pk_parameters(cohort, cohort.creatinine_base)
    n_steps = 12

    def doses(i):
        """(start hour, rate mg/h, hours) of every administration of patient i in the run."""
        out = []
        for start in range(0, 4 * (n_steps + 1), int(cohort.interval_h[i])):
            amount = cohort.loading_mg[i] if start == 0 else cohort.dose_mg[i]
            hours = int(np.ceil(amount / 1000.0))
            out.append((start, amount / hours, hours))
        return out

    def state(i, time):
        """[Ac, Ap, AUC] of patient i at `time` h, summed over the doses started before it."""
        p = [np.array([v[i]]) for v in (cl, vc, vp, q)]
        total = np.zeros(3)
        for start, rate, hours in doses(i):
            if start < time:
                total += analytic_infusion(*p, rate=rate, t_inf=hours, t=float(time - start))[0]
        return total

    sim = VancomycinSimulator(cohort, seed=0, config=config)
    sim.reset()
    assert sim.hour == 4
    np.testing.assert_allclose(sim.concentration, [state(i, 4)[0] / vc[i] for i in range(4)], rtol=1e-9)
    for t in range(n_steps):
        _, info = sim.step(np.zeros(4))
        end = 4 * (t + 2)
        for i in range(4):
            conc = state(i, end)[0] / vc[i]
            assert info.concentration[i] == pytest.approx(conc, rel=1e-9), (t, i)
            auc_now = state(i, end)[2]
            auc24 = auc_now - state(i, end - 24)[2] if end >= 24 else auc_now * 24.0 / end
            assert info.auc24[i] == pytest.approx(auc24, rel=1e-9), (t, i)
            interval = int(cohort.interval_h[i])
            last_dose = ((end - 1) // interval) * interval
            trough = state(i, last_dose)[0] / vc[i] if last_dose > 0 else 0.0
            assert info.trough[i] == pytest.approx(trough, rel=1e-9, abs=1e-12), (t, i)
        np.testing.assert_array_equal(info.dose_mg, cohort.dose_mg)
    # The typical patient (CL 4.5, 3 g/day) approaches AUC24 = 3000 / 4.5 = 667 mg*h/L.
    assert 600.0 < info.auc24[0] < 667.0
