"""Propofol/remifentanil anesthesia patient simulator, vectorised over patients.

Written from the published equations (PK: Schnider 1998, Eleveld 2018, Minto 1997, Eleveld 2017;
PD: Bouillon 2004 BIS surface, PAS's MAP/CO model); PAS 1.0.0 is the test oracle.
"""

from dosewise.sim.anesthesia.compartments import LogNormalSD, MammillaryPK, PKModel
from dosewise.sim.anesthesia.covariates import Covariates
from dosewise.sim.anesthesia.disturbances import PROFILES as DISTURBANCE_PROFILES
from dosewise.sim.anesthesia.open_loop import open_loop
from dosewise.sim.anesthesia.pd import BISParams, HemoParams
from dosewise.sim.anesthesia.pk_propofol import PROPOFOL_MODELS
from dosewise.sim.anesthesia.pk_remifentanil import REMIFENTANIL_MODELS
from dosewise.sim.anesthesia.simulator import AnesthesiaSimulator, Observation

__all__ = [
    "DISTURBANCE_PROFILES",
    "PROPOFOL_MODELS",
    "REMIFENTANIL_MODELS",
    "AnesthesiaSimulator",
    "BISParams",
    "Covariates",
    "HemoParams",
    "LogNormalSD",
    "MammillaryPK",
    "Observation",
    "PKModel",
    "open_loop",
]
