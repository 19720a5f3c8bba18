"""Pharmacodynamics: BIS from the two hypnotic effect sites, MAP and cardiac output from the hemodynamic sites.

Equations and default values are PAS 1.0.0's, so that noise-free trajectories match it; each
value cites the paper PAS takes it from. Parameters are [N] arrays so every patient can differ.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from dosewise.sim.anesthesia.compartments import cv_to_omega
from dosewise.sim.anesthesia.hill import hill


@dataclass(frozen=True)
class BISParams:
    """Bouillon et al. 2004, Anesthesiology 100:1353: Greco response surface for BIS."""

    c50p: np.ndarray  # [N] µg/mL, propofol effect-site concentration for half effect
    c50r: np.ndarray  # [N] ng/mL, remifentanil effect-site concentration for half effect
    gamma: np.ndarray  # [N] steepness
    beta: np.ndarray  # [N] interaction (0: additive in potency-normalised units)
    e0: np.ndarray  # [N] awake BIS
    emax: np.ndarray  # [N] maximal drop of BIS

    @classmethod
    def typical(cls, n: int) -> BISParams:
        return cls(*(np.full(n, v) for v in (4.47, 19.3, 1.43, 0.0, 97.4, 97.4)))


# Between-patient CVs of Bouillon 2004 as PAS uses them (c50p 18.2 %, c50r 88.8 %, gamma 30.4 %).
BIS_OMEGA = {"c50p": cv_to_omega(0.182), "c50r": cv_to_omega(0.888), "gamma": cv_to_omega(0.304)}


def bis(ce_propofol: np.ndarray, ce_remifentanil: np.ndarray, p: BISParams) -> np.ndarray:
    """BIS [N] = E0 - Emax I^g / (1 + I^g), I = (Up + Ur) / (1 - beta (phi - phi^2)), phi = Up / (Up + Ur)."""
    up = ce_propofol / p.c50p
    ur = ce_remifentanil / p.c50r
    phi = up / (up + ur + 1e-6)  # PAS's guard against 0/0 before any drug is given
    interaction = (up + ur) / (1.0 - p.beta * (phi - phi**2))
    ig = interaction**p.gamma
    return p.e0 - p.emax * ig / (1.0 + ig)


@dataclass(frozen=True)
class HemoParams:
    """MAP and cardiac-output model of PAS: baselines plus one Hill term per drug.

    Why cases recalibrate MAP (``dosewise.sim.anesthesia.cases``): with these defaults MAP falls to
    ~48 mmHg at a normal depth. One reason is the propofol MAP Emax, which PAS computes as
    Emax_DAP + (Emax_SAP + Emax_DAP) / 3 = 42.4 mmHg where the MAP of a SAP/DAP pair would be
    Emax_DAP + (Emax_SAP - Emax_DAP) / 3 = 30.3 mmHg. Kept as PAS has it, to match PAS.
    """

    map_base: np.ndarray  # [N] mmHg, baseline MAP (PAS default 90)
    co_base: np.ndarray  # [N] L/min, baseline cardiac output (PAS default 6.5)
    emax_propo_sap: np.ndarray  # [N] mmHg, Jeleazcov et al. 2015, Br J Anaesth 115:213
    emax_propo_dap: np.ndarray  # [N] mmHg, Jeleazcov 2015
    c50_propo_map_1: np.ndarray  # [N] µg/mL, Jeleazcov 2015, first MAP site
    gamma_propo_map_1: np.ndarray  # [N] Jeleazcov 2015
    c50_propo_map_2: np.ndarray  # [N] µg/mL, Jeleazcov 2015, second MAP site
    gamma_propo_map_2: np.ndarray  # [N] Jeleazcov 2015
    emax_remi_map: np.ndarray  # [N] mmHg, Standing et al. 2010, Paediatr Anaesth 20:7 (= -MAP baseline)
    c50_remi_map: np.ndarray  # [N] ng/mL, Standing 2010
    gamma_remi_map: np.ndarray  # [N] Standing 2010
    emax_propo_co: np.ndarray  # [N] L/min, Fairfield et al. 1991, Br J Anaesth 67:618
    c50_propo_co: np.ndarray  # [N] µg/mL, Fairfield 1991
    gamma_propo_co: np.ndarray  # [N] Fairfield 1991
    emax_remi_co: np.ndarray  # [N] L/min, Chanavaz et al. 2005, Br J Anaesth 94:74
    c50_remi_co: np.ndarray  # [N] ng/mL, Chanavaz 2005
    gamma_remi_co: np.ndarray  # [N] Chanavaz 2005

    @classmethod
    def typical(cls, n: int, map_base: float = 90.0, co_base: float = 6.5) -> HemoParams:
        values = {
            "map_base": map_base,
            "co_base": co_base,
            "emax_propo_sap": 54.8,
            "emax_propo_dap": 18.1,
            "c50_propo_map_1": 1.96,
            "gamma_propo_map_1": 4.77,
            "c50_propo_map_2": 2.20,
            "gamma_propo_map_2": 8.49,
            "emax_remi_map": -map_base,
            "c50_remi_map": 17.1,
            "gamma_remi_map": 4.56,
            "emax_propo_co": -2.0,
            "c50_propo_co": 2.6,
            "gamma_propo_co": 2.0,
            "emax_remi_co": -1.5,
            "c50_remi_co": 5.0,
            "gamma_remi_co": 2.0,
        }
        return cls(**{k: np.full(n, float(v)) for k, v in values.items()})


# Between-patient log-SDs of the MAP terms as PAS takes them from Jeleazcov 2015 and Standing 2010.
# The Hill slopes' variability (PAS: CV 559 % and 633 %, capped at 3x) and the CO terms, which
# no paper reports, are left fixed.
HEMO_OMEGA = {
    "emax_propo_sap": 0.0871,
    "emax_propo_dap": 0.207,
    "c50_propo_map_1": 0.165,
    "c50_propo_map_2": 0.148,
    "c50_remi_map": 0.09,
}


def sample_pd(params, omega: dict[str, float], rng: np.random.Generator):
    """Log-normal between-patient draw of the named fields of a PD parameter record."""
    drawn = {}
    for f in fields(params):
        if f.name in omega:
            value = getattr(params, f.name)
            drawn[f.name] = value * np.exp(omega[f.name] * rng.standard_normal(value.shape[0]))
    return replace(params, **drawn)


def hemodynamics(ce_propo_map: np.ndarray, ce_remi_map: np.ndarray, p: HemoParams) -> tuple[np.ndarray, np.ndarray]:
    """MAP [N] mmHg and CO [N] L/min from propofol's two MAP sites [N, 2] and remifentanil's MAP site [N]."""
    u = (ce_propo_map[:, 0] / p.c50_propo_map_1) ** p.gamma_propo_map_1 + (ce_propo_map[:, 1] / p.c50_propo_map_2) ** p.gamma_propo_map_2
    emax_propo_map = p.emax_propo_dap + (p.emax_propo_sap + p.emax_propo_dap) / 3.0
    map_remi = p.emax_remi_map * hill(ce_remi_map, p.c50_remi_map, p.gamma_remi_map)
    mean_ap = p.map_base - emax_propo_map * u / (1.0 + u) + map_remi
    co = (
        p.co_base
        + p.emax_propo_co * hill(ce_propo_map.mean(axis=1), p.c50_propo_co, p.gamma_propo_co)
        + p.emax_remi_co * hill(ce_remi_map, p.c50_remi_co, p.gamma_remi_co)
    )
    return mean_ap, co
