"""Batched propofol/remifentanil patient: exact PK steps, BIS and hemodynamic PD, optional noise.

One ``step`` advances all N patients by dt seconds with the infusions held constant over the
step; outputs are read after the step, as PAS's ``Patient.one_step`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dosewise.sim.anesthesia.compartments import PKModel, discretise, sample_patients
from dosewise.sim.anesthesia.covariates import Covariates
from dosewise.sim.anesthesia.noise import MeasurementNoise
from dosewise.sim.anesthesia.pd import (
    BIS_OMEGA,
    HEMO_OMEGA,
    BISParams,
    HemoParams,
    bis,
    hemodynamics,
    sample_pd,
)
from dosewise.sim.anesthesia.pk_propofol import PROPOFOL_MODELS
from dosewise.sim.anesthesia.pk_remifentanil import REMIFENTANIL_MODELS


@dataclass(frozen=True)
class Observation:
    """What the monitors and the models show after one step; every field is [N]."""

    bis: np.ndarray  # BIS (0-100)
    map: np.ndarray  # mmHg
    co: np.ndarray  # L/min
    cp_propofol: np.ndarray  # µg/mL plasma
    ce_propofol: np.ndarray  # µg/mL BIS effect site
    cp_remifentanil: np.ndarray  # ng/mL plasma
    ce_remifentanil: np.ndarray  # ng/mL BIS effect site


def _lookup(models: dict[str, PKModel], name: str, drug: str) -> PKModel:
    if name not in models:
        raise ValueError(f"unknown {drug} model {name!r}; known: {sorted(models)}")
    return models[name]


class AnesthesiaSimulator:
    """N patients under propofol (mg/s) and remifentanil (µg/s) infusions.

    ``variability`` draws each patient's PK and PD parameters log-normally around the population
    model (published between-patient SDs); ``noise`` adds PAS-like measurement noise. Both draw
    only from ``rng``. ``hemo`` replaces the MAP/CO parameters (the calibration hook).
    """

    def __init__(
        self,
        covariates: Covariates,
        dt: float = 1.0,
        propofol_model: str = "Schnider",
        remifentanil_model: str = "Minto",
        variability: bool = False,
        noise: bool = False,
        rng: np.random.Generator | None = None,
        hemo: HemoParams | None = None,
    ):
        if not (np.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {dt}")
        if (variability or noise) and rng is None:
            raise ValueError("variability and noise draw from rng: pass an np.random.Generator")
        propo_model = _lookup(PROPOFOL_MODELS, propofol_model, "propofol")
        remi_model = _lookup(REMIFENTANIL_MODELS, remifentanil_model, "remifentanil")
        n = covariates.n
        self.covariates, self.dt, self.noise_on, self.rng = covariates, float(dt), noise, rng
        propo_pk, remi_pk = propo_model.typical(covariates), remi_model.typical(covariates)
        self.bis_params = BISParams.typical(n)
        self.hemo_params = hemo if hemo is not None else HemoParams.typical(n)
        if variability:
            propo_pk = sample_patients(propo_pk, propo_model.omega, rng)
            remi_pk = sample_patients(remi_pk, remi_model.omega, rng)
            self.bis_params = sample_pd(self.bis_params, BIS_OMEGA, rng)
            self.hemo_params = sample_pd(self.hemo_params, HEMO_OMEGA, rng)
        self.propo_pk, self.remi_pk = propo_pk, remi_pk
        self.phi_p, self.gamma_p = discretise(propo_pk, self.dt)  # [N, 6, 6], [N, 6]
        self.phi_r, self.gamma_r = discretise(remi_pk, self.dt)  # [N, 5, 5], [N, 5]
        self.reset()

    @property
    def n(self) -> int:
        return self.covariates.n

    def reset(self) -> None:
        """Drug-free patients at time 0 (the noise filter restarts too; parameters are kept)."""
        self.x_p = np.zeros((self.n, self.phi_p.shape[1]))  # [N, 6] concentrations
        self.x_r = np.zeros((self.n, self.phi_r.shape[1]))  # [N, 5]
        self.steps = 0
        self.noise = MeasurementNoise(self.n, self.dt, self.rng) if self.noise_on else None

    def step(self, propofol: np.ndarray, remifentanil: np.ndarray, disturbance: np.ndarray | None = None) -> Observation:
        """Advance dt with rates propofol [N] mg/s and remifentanil [N] µg/s; disturbance [N, 3] or [3]
        is added to (BIS, MAP, CO) before noise."""
        u_p, u_r = self._rates(propofol, "propofol"), self._rates(remifentanil, "remifentanil")
        self.x_p = np.einsum("nij,nj->ni", self.phi_p, self.x_p) + self.gamma_p * u_p[:, None]
        self.x_r = np.einsum("nij,nj->ni", self.phi_r, self.x_r) + self.gamma_r * u_r[:, None]
        self.steps += 1
        level = bis(self.x_p[:, 3], self.x_r[:, 3], self.bis_params)
        mean_ap, co = hemodynamics(self.x_p[:, 4:6], self.x_r[:, 4], self.hemo_params)
        if disturbance is not None:
            d = np.broadcast_to(np.asarray(disturbance, dtype=float), (self.n, 3))
            level, mean_ap, co = level + d[:, 0], mean_ap + d[:, 1], co + d[:, 2]
        if self.noise is not None:
            e_bis, e_map, e_co = self.noise.sample()
            level, mean_ap, co = np.clip(level + e_bis, 0.0, 100.0), mean_ap + e_map, co + e_co
        return Observation(
            bis=level,
            map=mean_ap,
            co=co,
            cp_propofol=self.x_p[:, 0].copy(),
            ce_propofol=self.x_p[:, 3].copy(),
            cp_remifentanil=self.x_r[:, 0].copy(),
            ce_remifentanil=self.x_r[:, 3].copy(),
        )

    def _rates(self, rate, drug: str) -> np.ndarray:
        u = np.asarray(rate, dtype=float)
        if u.shape != (self.n,):
            raise ValueError(f"{drug} rate must have shape ({self.n},), got {u.shape}")
        return u
