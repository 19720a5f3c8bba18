import numpy as np
import pytest
from scipy.linalg import expm

from dosewise.sim.linalg import expm_batched
from dosewise.sim.vancomycin import pk_parameters, sample_cohort


def test_batched_expm_matches_scipy_on_pk_generators_and_random_matrices():
    rng = np.random.default_rng(0)
    cohort = sample_cohort(200, rng)
    cl, vc, vp, q = pk_parameters(cohort, cohort.creatinine_base)
    gen = np.zeros((200, 4, 4))
    gen[:, 0, 0], gen[:, 0, 1] = -(cl + q) / vc, q / vp
    gen[:, 1, 0], gen[:, 1, 1] = q / vc, -q / vp
    gen[:, 2, 0], gen[:, 0, 3] = 1.0 / vc, 1.0
    for stack in (gen, gen * 4.0, rng.normal(size=(50, 4, 4)) * 3.0):
        reference = np.stack([expm(m) for m in stack])
        np.testing.assert_allclose(expm_batched(stack), reference, rtol=1e-11, atol=1e-12)


def test_kidney_injury_lowers_clearance_even_under_the_age_floor():
    # Goti floors SCr at 1 mg/dL above 60 years; an older patient with baseline 0.6 whose
    # creatinine rises to 0.9 (GFR x 0.67) must still lose clearance.
    cohort = sample_cohort(1, np.random.default_rng(1))
    old = cohort.__class__(**{**cohort.__dict__, "age": np.array([75.0]), "creatinine_base": np.array([0.6])})
    cl_base = pk_parameters(old, np.array([0.6]))[0][0]
    cl_injured = pk_parameters(old, np.array([0.9]))[0][0]
    assert cl_injured / cl_base == pytest.approx((0.6 / 0.9) ** 0.8, rel=1e-9)
