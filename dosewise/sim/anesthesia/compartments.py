"""Three-compartment mammillary PK with effect sites, batched, and its exact zero-order-hold step.

The state is concentrations (central, fast peripheral, slow peripheral, then one effect site per
pharmacodynamic target), the same layout as PAS, so the trajectories can be compared state by state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np

from dosewise.sim.anesthesia.covariates import Covariates
from dosewise.sim.linalg import expm_batched


@dataclass(frozen=True)
class MammillaryPK:
    """PK parameters of one drug for N patients (typical values or one patient's draw)."""

    v1: np.ndarray  # [N] L, central volume
    v2: np.ndarray  # [N] L, fast peripheral volume
    v3: np.ndarray  # [N] L, slow peripheral volume
    cl1: np.ndarray  # [N] L/min, elimination clearance
    cl2: np.ndarray  # [N] L/min, fast inter-compartmental clearance
    cl3: np.ndarray  # [N] L/min, slow inter-compartmental clearance
    ke: np.ndarray  # [N, K] 1/min, effect-site equilibration rates; column 0 is the BIS (hypnotic) site


@dataclass(frozen=True)
class LogNormalSD:
    """Between-patient log-normal SDs (omega, not omega^2) of each MammillaryPK field."""

    v1: float
    v2: float
    v3: float
    cl1: float
    cl2: float
    cl3: float
    ke: tuple[float, ...]  # one per effect site, same order as MammillaryPK.ke


@dataclass(frozen=True)
class PKModel:
    """A published population model: typical values from covariates, and its variability."""

    name: str
    typical: Callable[[Covariates], MammillaryPK]
    omega: LogNormalSD


def cv_to_omega(cv: float) -> float:
    """Log-normal SD with the given coefficient of variation: sqrt(log(1 + CV^2))."""
    return float(np.sqrt(np.log1p(cv**2)))


def sample_patients(pk: MammillaryPK, omega: LogNormalSD, rng: np.random.Generator) -> MammillaryPK:
    """Each patient's parameters: typical value * exp(eta), eta ~ N(0, omega^2), independent per parameter."""
    n, k = pk.ke.shape
    drawn = {}
    for f in fields(MammillaryPK):
        if f.name == "ke":
            continue
        drawn[f.name] = getattr(pk, f.name) * np.exp(getattr(omega, f.name) * rng.standard_normal(n))
    drawn["ke"] = pk.ke * np.exp(np.asarray(omega.ke) * rng.standard_normal((n, k)))
    return replace(pk, **drawn)


def generator(pk: MammillaryPK) -> tuple[np.ndarray, np.ndarray]:
    """Continuous-time A [N, S, S] (1/s) and input gain b [N, S] (1/L), S = 3 + K.

    dC1/dt = -(k10 + k12 + k13) C1 + k12 C2 + k13 C3 + u / V1, dC2/dt = k21 (C1 - C2),
    dC3/dt = k31 (C1 - C3), dCe_j/dt = ke_j (C1 - Ce_j); rates are per minute, divided by 60.
    """
    n, k = pk.ke.shape
    s = 3 + k
    k10, k12, k13 = pk.cl1 / pk.v1, pk.cl2 / pk.v1, pk.cl3 / pk.v1  # [N] 1/min
    k21, k31 = pk.cl2 / pk.v2, pk.cl3 / pk.v3  # [N] 1/min
    a = np.zeros((n, s, s))  # [N, S, S]
    a[:, 0, 0] = -(k10 + k12 + k13)
    a[:, 0, 1] = k12
    a[:, 0, 2] = k13
    a[:, 1, 0] = k21
    a[:, 1, 1] = -k21
    a[:, 2, 0] = k31
    a[:, 2, 2] = -k31
    sites = np.arange(3, s)
    a[:, sites, 0] = pk.ke
    a[:, sites, sites] = -pk.ke
    b = np.zeros((n, s))  # [N, S]
    b[:, 0] = 1.0 / pk.v1
    return a / 60.0, b


def discretise(pk: MammillaryPK, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact step over dt seconds with the infusion held constant (zero-order hold).

    Returns phi [N, S, S] and gamma [N, S] with x(t + dt) = phi x(t) + gamma u, the blocks of
    expm([[A, b], [0, 0]] dt): the same discretisation as ``control.StateSpace.sample`` in PAS.
    """
    a, b = generator(pk)
    n, s = b.shape
    aug = np.zeros((n, s + 1, s + 1))  # [N, S+1, S+1]
    aug[:, :s, :s] = a
    aug[:, :s, s] = b
    prop = expm_batched(aug * dt)
    return prop[:, :s, :s], prop[:, :s, s]
