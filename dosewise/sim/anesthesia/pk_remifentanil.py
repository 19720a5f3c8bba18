"""Remifentanil population PK models (state: plasma, 2 peripherals, BIS site, MAP site; ng/mL)."""

from __future__ import annotations

import numpy as np

from dosewise.sim.anesthesia.compartments import (
    LogNormalSD,
    MammillaryPK,
    PKModel,
    cv_to_omega,
)
from dosewise.sim.anesthesia.covariates import Covariates, al_sallami_ffm
from dosewise.sim.anesthesia.hill import hill

# MAP effect site of remifentanil, Standing et al. 2010, Paediatr Anaesth 20:7 (1/min), and its
# between-patient log-SD as PAS 1.0.0 takes it from that paper.
KE_MAP = 0.81
OMEGA_KE_MAP = 0.41


def _effect_sites(ke0: np.ndarray) -> np.ndarray:
    """[N, 2] rates (1/min): BIS site, then the MAP site."""
    return np.stack([ke0, np.full(ke0.shape[0], KE_MAP)], axis=1)


def minto(cov: Covariates) -> MammillaryPK:
    """Minto et al. 1997, Anesthesiology 86:10 (PK) and 86:24 (ke0)."""
    age, lbm = cov.age, cov.lbm
    return MammillaryPK(
        v1=5.1 - 0.0201 * (age - 40) + 0.072 * (lbm - 55),  # L
        v2=9.82 - 0.0811 * (age - 40) + 0.108 * (lbm - 55),  # L
        v3=np.full(cov.n, 5.42),  # L
        cl1=2.6 - 0.0162 * (age - 40) + 0.0191 * (lbm - 55),  # L/min
        cl2=2.05 - 0.0301 * (age - 40),  # L/min
        cl3=0.076 - 0.00113 * (age - 40),  # L/min
        ke=_effect_sites(0.595 - 0.007 * (age - 40)),  # 1/min
    )


# Minto 1997: between-patient CVs V1 26 %, V2 29 %, V3 66 %, CL1 14 %, CL2 36 %, CL3 41 %, ke0 68 %.
MINTO_OMEGA = LogNormalSD(
    v1=cv_to_omega(0.26),
    v2=cv_to_omega(0.29),
    v3=cv_to_omega(0.66),
    cl1=cv_to_omega(0.14),
    cl2=cv_to_omega(0.36),
    cl3=cv_to_omega(0.41),
    ke=(cv_to_omega(0.68), OMEGA_KE_MAP),
)


def eleveld(cov: Covariates) -> MammillaryPK:
    """Eleveld et al. 2017, Anesthesiology 126:1005 (allometric PK-PD); reference 35 y, 70 kg, 170 cm male."""
    age, weight, sex = cov.age, cov.weight, cov.sex
    age_ref, weight_ref = 35.0, 70.0
    ffm_ref = al_sallami_ffm(np.array([1.0]), np.array([weight_ref]), np.array([age_ref]), np.array([weight_ref / 1.7**2]))
    size = al_sallami_ffm(sex, weight, age, cov.bmi) / ffm_ref
    mat = hill(weight, 2.88, 2.0) / hill(weight_ref, 2.88, 2.0)  # theta1 kg
    ksex = np.where(sex == 1.0, 1.0, 1.0 + 0.470 * hill(age, 12.0, 6.0) * (1.0 - hill(age, 45.0, 6.0)))  # theta5

    def aging(theta):
        return np.exp(theta * (age - age_ref))

    v1_ref, v2_ref, v3_ref = 5.81, 8.882, 5.03  # L
    v1 = v1_ref * size * aging(-0.00554)  # theta2
    v2 = v2_ref * size * aging(-0.00327)  # theta3
    v3 = v3_ref * size * aging(-0.0315) * np.exp(-0.0260 * (weight - weight_ref))  # theta4, theta6
    cl1 = 2.58 * size**0.75 * mat * ksex * aging(-0.00327)  # L/min
    cl2 = 1.72 * (v2 / v2_ref) ** 0.75 * aging(-0.00554) * ksex  # L/min
    cl3 = 0.124 * (v3 / v3_ref) ** 0.75 * aging(-0.00554)  # L/min
    ke0 = 1.09 * aging(-0.0289)  # 1/min
    return MammillaryPK(v1=v1, v2=v2, v3=v3, cl1=cl1, cl2=cl2, cl3=cl3, ke=_effect_sites(ke0))


# Eleveld 2017 Table 2, omega^2 of eta for V1, V2, V3, CL, Q2, Q3 and ke0.
ELEVELD_OMEGA = LogNormalSD(
    v1=float(np.sqrt(0.104)),
    v2=float(np.sqrt(0.115)),
    v3=float(np.sqrt(0.810)),
    cl1=float(np.sqrt(0.0197)),
    cl2=float(np.sqrt(0.0547)),
    cl3=float(np.sqrt(0.285)),
    ke=(float(np.sqrt(1.26)), OMEGA_KE_MAP),
)

REMIFENTANIL_MODELS: dict[str, PKModel] = {
    "Minto": PKModel("Minto", minto, MINTO_OMEGA),
    "Eleveld": PKModel("Eleveld", eleveld, ELEVELD_OMEGA),
}
