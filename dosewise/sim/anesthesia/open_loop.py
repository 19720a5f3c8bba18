"""Open-loop simulation: given infusion schedules [N, T], return every patient's trajectories."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from dosewise.sim.anesthesia.covariates import Covariates
from dosewise.sim.anesthesia.disturbances import disturbance as disturbance_profile
from dosewise.sim.anesthesia.simulator import AnesthesiaSimulator, Observation


def _schedule(rate, name: str) -> np.ndarray:
    u = np.asarray(rate, dtype=float)
    if u.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N patients, T steps], got shape {u.shape}")
    if not np.isfinite(u).all() or (u < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    return u


def open_loop(
    age,
    height,
    weight,
    sex,
    propofol_mg_s,
    remifentanil_ug_s,
    dt: float = 1.0,
    propofol_model: str = "Schnider",
    remifentanil_model: str = "Minto",
    noise: bool = False,
    rng: np.random.Generator | None = None,
    variability: bool = False,
    disturbance: str | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Simulate N patients for T steps of dt seconds from time 0, drug-free at the start.

    Covariates are [N] (age y, height cm, weight kg, sex 1 male / 0 female); rates are [N, T]
    (propofol mg/s, remifentanil µg/s), constant within each step. ``disturbance`` is a profile
    name (see ``disturbances.PROFILES``), a breakpoint table [P, 4], or additive values [N, T, 3]
    on (BIS, MAP, CO); step k sees the profile at time k * dt. Returns arrays [N, T] keyed by the
    ``Observation`` fields, each the value at the end of its step (transposed views of the [T, N]
    buffers the loop fills row by row: copying 7 x N x T floats would cost as much as simulating).
    """
    cov = Covariates.from_arrays(age, height, weight, sex)
    u_p = _schedule(propofol_mg_s, "propofol_mg_s")
    u_r = _schedule(remifentanil_ug_s, "remifentanil_ug_s")
    if u_p.shape != u_r.shape or u_p.shape[0] != cov.n:
        raise ValueError(f"propofol_mg_s {u_p.shape} and remifentanil_ug_s {u_r.shape} must both be [N, T] with N = {cov.n} patients")
    sim = AnesthesiaSimulator(cov, dt, propofol_model, remifentanil_model, variability, noise, rng)
    n, t = u_p.shape
    dist = _disturbance(disturbance, n, t, sim.dt)  # [N, T, 3] or None
    names = [f.name for f in fields(Observation)]
    by_time = {key: np.empty((t, n)) for key in names}  # [T, N]: one contiguous row per step
    u_p_t, u_r_t = np.ascontiguousarray(u_p.T), np.ascontiguousarray(u_r.T)  # [T, N]
    for k in range(t):
        obs = sim.step(u_p_t[k], u_r_t[k], None if dist is None else dist[:, k])
        for key in names:
            by_time[key][k] = getattr(obs, key)
    return {key: v.T for key, v in by_time.items()}  # [N, T] views (Fortran order): no copy of the output


def _disturbance(spec, n: int, t: int, dt: float) -> np.ndarray | None:
    """Additive (BIS, MAP, CO) [N, T, 3] from a profile name, a breakpoint table or explicit values."""
    if spec is None:
        return None
    if isinstance(spec, str) or np.ndim(spec) == 2:
        return np.broadcast_to(disturbance_profile(spec, np.arange(t) * dt), (n, t, 3))
    values = np.asarray(spec, dtype=float)
    if values.shape != (n, t, 3):
        raise ValueError(f"explicit disturbance must be [N, T, 3] = {(n, t, 3)}, got {values.shape}")
    return values
