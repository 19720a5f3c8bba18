"""Propofol population PK models (state: plasma, 2 peripherals, BIS site, 2 MAP sites; µg/mL)."""

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

# MAP effect sites of propofol, Jeleazcov et al. 2015, Br J Anaesth 115:213 (two sites, 1/min).
KE_MAP_1 = 0.054
KE_MAP_2 = 0.0695
# Their between-patient log-SDs as PAS 1.0.0 takes them from Jeleazcov 2015 (not re-read in the paper).
OMEGA_KE_MAP = (1.5, 1.48)


def _effect_sites(ke0: np.ndarray) -> np.ndarray:
    """[N, 3] rates (1/min): BIS site, then the two MAP sites."""
    n = ke0.shape[0]
    return np.stack([ke0, np.full(n, KE_MAP_1), np.full(n, KE_MAP_2)], axis=1)


def schnider(cov: Covariates) -> MammillaryPK:
    """Schnider et al. 1998, Anesthesiology 88:1170 (PK); ke0 0.456/min from Schnider 1999, 90:1502."""
    age, height, weight, lbm = cov.age, cov.height, cov.weight, cov.lbm
    n = cov.n
    return MammillaryPK(
        v1=np.full(n, 4.27),  # L
        v2=18.9 - 0.391 * (age - 53),  # L
        v3=np.full(n, 238.0),  # L
        cl1=1.89 + 0.0456 * (weight - 77) - 0.0681 * (lbm - 59) + 0.0264 * (height - 177),  # L/min
        cl2=1.29 - 0.024 * (age - 53),  # L/min
        cl3=np.full(n, 0.836),  # L/min
        ke=_effect_sites(np.full(n, 0.456)),  # 1/min
    )


# Schnider 1998 reports the NONMEM variances omega^2 of eta (0.0404, 0.01, 0.1435, 0.1005, 0.01,
# 0.1179), so omega = sqrt(omega^2). PAS 1.0.0 instead multiplies them by the typical value and
# reads the product as a CV, which gives V3 a log-SD of 2.6 (a 14-fold SD): not copied.
# ke0 variability is not reported; 42 % CV is an assumption (the figure PAS names).
SCHNIDER_OMEGA = LogNormalSD(
    v1=float(np.sqrt(0.0404)),
    v2=float(np.sqrt(0.01)),
    v3=float(np.sqrt(0.1435)),
    cl1=float(np.sqrt(0.1005)),
    cl2=float(np.sqrt(0.01)),
    cl3=float(np.sqrt(0.1179)),
    ke=(cv_to_omega(0.42), *OMEGA_KE_MAP),
)


def eleveld(cov: Covariates) -> MammillaryPK:
    """Eleveld et al. 2018, Br J Anaesth 120:942, arterial samples, opioids co-administered.

    theta numbering follows the paper's Table 2; the reference patient is a 35-year-old
    170 cm 70 kg male. Remifentanil is always given here, so the "with opiates" terms apply.
    """
    age, weight, sex = cov.age, cov.weight, cov.sex
    age_ref, weight_ref = 35.0, 70.0
    pma_weeks = (age + 40.0 / 52.0) * 52.0  # post-menstrual age of a term birth
    pma_ref_weeks = 40.0 + age_ref * 52.0
    ffm = al_sallami_ffm(sex, weight, age, cov.bmi)
    ffm_ref = al_sallami_ffm(np.array([1.0]), np.array([weight_ref]), np.array([age_ref]), np.array([weight_ref / 1.7**2]))
    cl_mat = hill(pma_weeks, 42.2760190602615, 9.0548452392807)  # theta8 E50 weeks, theta9 slope
    cl_mat_ref = hill(pma_ref_weeks, 42.2760190602615, 9.0548452392807)
    q3_mat = hill(pma_weeks, 68.2767978846832, 1.0)  # theta14 weeks
    q3_mat_ref = hill(pma_ref_weeks, 68.2767978846832, 1.0)
    central = hill(weight, 33.5531248778544, 1.0)  # theta12 kg
    central_ref = hill(weight_ref, 33.5531248778544, 1.0)

    v1 = 6.2830780766822 * central / central_ref  # theta1 L
    v2_ref, v3_ref = 25.5013145036879, 272.8166615043603  # theta2, theta3 L
    v2 = v2_ref * weight / weight_ref * np.exp(-0.015633 * (age - age_ref))  # theta10
    v3 = v3_ref * ffm / ffm_ref * np.exp(-0.0138166 * age)  # theta13, opiates present
    cl_typ = np.where(sex == 1.0, 1.7895836588902, 2.1002218877899)  # theta4 male, theta15 female L/min
    cl1 = cl_typ * (weight / weight_ref) ** 0.75 * cl_mat / cl_mat_ref * np.exp(-0.00285709 * age)  # theta11
    cl2 = 1.7500983738779 * (v2 / v2_ref) ** 0.75 * (1.0 + 1.3042680471360 * (1.0 - q3_mat))  # theta5, theta16
    cl3 = 1.1085424008536 * (v3 / v3_ref) ** 0.75 * q3_mat / q3_mat_ref  # theta6 L/min
    ke0 = 0.146 * (weight / weight_ref) ** -0.25  # 1/min, arterial
    return MammillaryPK(v1=v1, v2=v2, v3=v3, cl1=cl1, cl2=cl2, cl3=cl3, ke=_effect_sites(ke0))


# Eleveld 2018 Table 2, omega^2 of eta for V1, V2, V3, CL, Q2, Q3 and ke0.
ELEVELD_OMEGA = LogNormalSD(
    v1=float(np.sqrt(0.610)),
    v2=float(np.sqrt(0.565)),
    v3=float(np.sqrt(0.597)),
    cl1=float(np.sqrt(0.265)),
    cl2=float(np.sqrt(0.346)),
    cl3=float(np.sqrt(0.209)),
    ke=(float(np.sqrt(0.702)), *OMEGA_KE_MAP),
)

PROPOFOL_MODELS: dict[str, PKModel] = {
    "Schnider": PKModel("Schnider", schnider, SCHNIDER_OMEGA),
    "Eleveld": PKModel("Eleveld", eleveld, ELEVELD_OMEGA),
}
