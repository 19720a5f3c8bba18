"""Shapes, argument checks, batching, variability and disturbances of the anesthesia simulator (no PAS needed)."""

import numpy as np
import pytest

from dosewise.sim.anesthesia import (
    PROPOFOL_MODELS,
    REMIFENTANIL_MODELS,
    AnesthesiaSimulator,
    Covariates,
    open_loop,
)
from dosewise.sim.anesthesia.compartments import discretise, generator, sample_patients
from dosewise.sim.anesthesia.disturbances import disturbance
from dosewise.sim.anesthesia.pk_propofol import SCHNIDER_OMEGA

KEYS = ("bis", "map", "co", "cp_propofol", "ce_propofol", "cp_remifentanil", "ce_remifentanil")


def cohort(n=4, seed=0):
    rng = np.random.default_rng(seed)
    cov = {"age": rng.uniform(20, 80, n), "height": rng.uniform(150, 190, n), "weight": rng.uniform(50, 100, n), "sex": np.arange(n) % 2.0}
    t = 300
    u_p = np.repeat(rng.uniform(0, 0.4, (n, 5)), t // 5, axis=1)  # [N, T] mg/s
    u_r = np.repeat(rng.uniform(0, 0.5, (n, 5)), t // 5, axis=1)  # [N, T] µg/s
    return cov, u_p, u_r


def test_shapes_and_drug_free_start():
    cov, u_p, u_r = cohort()
    out = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r)
    for key in KEYS:
        assert out[key].shape == u_p.shape
    zero = open_loop(**cov, propofol_mg_s=0 * u_p, remifentanil_ug_s=0 * u_r)
    np.testing.assert_allclose(zero["bis"], 97.4)
    np.testing.assert_allclose(zero["map"], 90.0)
    np.testing.assert_allclose(zero["co"], 6.5)


@pytest.mark.parametrize("propofol_model", sorted(PROPOFOL_MODELS))
@pytest.mark.parametrize("remifentanil_model", sorted(REMIFENTANIL_MODELS))
def test_batch_equals_one_patient_at_a_time(propofol_model, remifentanil_model):
    cov, u_p, u_r = cohort()
    kw = {"propofol_model": propofol_model, "remifentanil_model": remifentanil_model}
    batch = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, **kw)
    for i in range(u_p.shape[0]):
        one = open_loop(**{k: v[i : i + 1] for k, v in cov.items()}, propofol_mg_s=u_p[i : i + 1], remifentanil_ug_s=u_r[i : i + 1], **kw)
        for key in KEYS:
            np.testing.assert_allclose(batch[key][i], one[key][0], rtol=1e-12, atol=1e-12)


def test_exact_step_matches_eigen_solution():
    """The ZOH propagator equals the analytic solution through the eigen-decomposition of A."""
    cov = Covariates.from_arrays([40.0, 70.0], [170.0, 160.0], [70.0, 55.0], [1.0, 0.0])
    pk = PROPOFOL_MODELS["Eleveld"].typical(cov)
    a, b = generator(pk)
    phi, gamma = discretise(pk, 5.0)
    for i in range(2):
        w, v = np.linalg.eig(a[i])
        vinv = np.linalg.inv(v)
        exact_phi = (v * np.exp(w * 5.0)) @ vinv
        exact_gamma = (v * ((np.exp(w * 5.0) - 1.0) / w)) @ vinv @ b[i]
        np.testing.assert_allclose(phi[i], exact_phi.real, atol=1e-12)
        np.testing.assert_allclose(gamma[i], exact_gamma.real, atol=1e-12)


def test_steady_state_is_rate_over_clearance():
    """Long exact steps (dt = 10 min) reach the textbook steady state Css = rate / CL."""
    cov = Covariates.from_arrays([45.0], [175.0], [75.0], [1.0])
    sim = AnesthesiaSimulator(cov, dt=600.0)
    for _ in range(6 * 24 * 4):  # four days at 0.1 mg/s (the slow compartment's time constant is ~5 h)
        obs = sim.step(np.array([0.1]), np.array([0.0]))
    cl = PROPOFOL_MODELS["Schnider"].typical(cov).cl1  # L/min
    np.testing.assert_allclose(obs.cp_propofol, 0.1 * 60.0 / cl, rtol=2e-3)


def test_stepping_class_reset_replays_identically():
    cov, u_p, u_r = cohort()
    sim = AnesthesiaSimulator(Covariates.from_arrays(**cov))
    first = [sim.step(u_p[:, k], u_r[:, k]).bis for k in range(50)]
    sim.reset()
    second = [sim.step(u_p[:, k], u_r[:, k]).bis for k in range(50)]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_bad_arguments_raise_clear_errors():
    cov, u_p, u_r = cohort()
    with pytest.raises(ValueError, match="known: \\['Eleveld', 'Schnider'\\]"):
        open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, propofol_model="Marsh")
    with pytest.raises(ValueError, match="known: \\['Eleveld', 'Minto'\\]"):
        open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, remifentanil_model="Kim")
    with pytest.raises(ValueError, match="must both be \\[N, T\\]"):
        open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r[:, :-1])
    with pytest.raises(ValueError, match="N = 4"):
        open_loop(**cov, propofol_mg_s=u_p[:3], remifentanil_ug_s=u_r[:3])
    with pytest.raises(ValueError, match="2-D"):
        open_loop(**cov, propofol_mg_s=u_p[0], remifentanil_ug_s=u_r[0])
    with pytest.raises(ValueError, match="non-negative"):
        open_loop(**cov, propofol_mg_s=-u_p, remifentanil_ug_s=u_r)
    with pytest.raises(ValueError, match="mismatched shapes"):
        open_loop(**{**cov, "age": cov["age"][:2]}, propofol_mg_s=u_p, remifentanil_ug_s=u_r)
    with pytest.raises(ValueError, match="sex must be 1"):
        open_loop(**{**cov, "sex": cov["sex"] + 0.5}, propofol_mg_s=u_p, remifentanil_ug_s=u_r)
    with pytest.raises(ValueError, match="dt"):
        open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, dt=0.0)
    with pytest.raises(ValueError, match="rng"):
        open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, noise=True)
    with pytest.raises(ValueError, match="unknown disturbance profile"):
        open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, disturbance="surgery")
    sim = AnesthesiaSimulator(Covariates.from_arrays(**cov))
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        sim.step(np.zeros(3), np.zeros(4))


def test_schnider_variability_uses_published_log_sds():
    """V3 log-SD is sqrt(0.1435) = 0.38 (Schnider 1998), not PAS's 2.6."""
    cov = Covariates.from_arrays(np.full(20000, 50.0), 170.0, 70.0, 1.0)
    typical = PROPOFOL_MODELS["Schnider"].typical(cov)
    drawn = sample_patients(typical, SCHNIDER_OMEGA, np.random.default_rng(1))
    for name, omega in (("v1", 0.201), ("v3", 0.379), ("cl1", 0.317), ("cl3", 0.343)):
        log_ratio = np.log(getattr(drawn, name) / getattr(typical, name))
        assert abs(log_ratio.mean()) < 0.02 and log_ratio.std() == pytest.approx(omega, rel=0.03), name


def test_random_draws_come_only_from_rng():
    cov, u_p, u_r = cohort()
    kw = {"propofol_mg_s": u_p, "remifentanil_ug_s": u_r, "variability": True, "noise": True}
    a = open_loop(**cov, rng=np.random.default_rng(7), **kw)
    b = open_loop(**cov, rng=np.random.default_rng(7), **kw)
    c = open_loop(**cov, rng=np.random.default_rng(8), **kw)
    np.testing.assert_array_equal(a["bis"], b["bis"])
    assert np.abs(a["bis"] - c["bis"]).max() > 1.0
    assert (a["bis"] >= 0).all() and (a["bis"] <= 100).all()


def test_measurement_noise_spread():
    cov, u_p, u_r = cohort(n=200)
    clean = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r)
    noisy = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, noise=True, rng=np.random.default_rng(0))
    assert (noisy["map"] - clean["map"]).std() == pytest.approx(5.0, rel=0.02)
    assert (noisy["co"] - clean["co"]).std() == pytest.approx(0.1, rel=0.02)
    np.testing.assert_array_equal(noisy["ce_propofol"], clean["ce_propofol"])  # noise is on the monitors only


def test_disturbance_is_additive_on_monitors():
    cov, u_p, u_r = cohort()
    u_p, u_r = np.tile(u_p, 12), np.tile(u_r, 12)  # [N, 3600]: one hour covers the Struys profile
    clean = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r)
    hit = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r, disturbance="struys2004")
    profile = disturbance("struys2004", np.arange(u_p.shape[1]) * 1.0)  # [T, 3]
    np.testing.assert_allclose(hit["bis"] - clean["bis"], np.broadcast_to(profile[:, 0], u_p.shape), atol=1e-9)
    np.testing.assert_allclose(hit["map"] - clean["map"], np.broadcast_to(profile[:, 1], u_p.shape), atol=1e-9)
    assert profile[:, 0].max() == 30.0 and profile[600, 0] == 20.0  # intubation at 10 min
