"""Dual-loop PID anchor controller, after Liu et al. 2011 (Anesth Analg 112:546; n = 196).

Liu's controller steered propofol by BIS and brought remifentanil in to help when BIS stayed
off target; it kept BIS 40-60 for 82 % +- 12 of the time vs 71 % +- 19 by hand. Liu titrated
effect-site targets of TCI pumps; here the loops act on the same pump rates (mL/h) every
decision step as every other policy, so the gains are ours, tuned on simulated patients, not
the paper's. It has no MAP loop, as Liu's had none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dosewise.sim.anesthesia.cases import MAX_RATE_ML_H, CaseCohort, CaseHistory


@dataclass(frozen=True)
class DualLoopGains:
    bis_target: float = 50.0
    induction_ml_h: float = 200.0  # top rate until BIS first falls below 60
    propofol_base_ml_kg_h: float = 0.33  # ~110 ug/kg/min
    kp: float = 0.02  # mL/kg/h per BIS point
    ki: float = 0.002  # mL/kg/h per BIS point-minute
    integral_limit: float = 150.0  # BIS point-minutes (anti-windup)
    remifentanil_base_ml_kg_h: float = 0.3  # ~0.1 ug/kg/min
    remifentanil_assist: float = 0.03  # mL/kg/h per BIS point above target + 5
    dead_band: float = 5.0


class DualLoopPID:
    def __init__(self, cohort: CaseCohort, gains: DualLoopGains = DualLoopGains()):
        self.gains, self.weight = gains, cohort.covariates.weight
        self.integral = np.zeros(cohort.n)
        self.induced = np.zeros(cohort.n, dtype=bool)

    def __call__(self, history: CaseHistory) -> tuple[np.ndarray, np.ndarray]:
        g = self.gains
        bis = history.vitals[:, -1, 0]
        self.induced |= (bis < 60.0) & (history.t > 0)
        error = np.where(self.induced, bis - g.bis_target, 0.0)
        self.integral = np.clip(self.integral + error, -g.integral_limit, g.integral_limit)
        propofol = self.weight * (g.propofol_base_ml_kg_h + g.kp * error + g.ki * self.integral)
        propofol = np.where(self.induced, propofol, g.induction_ml_h)
        assist = np.maximum(error - g.dead_band, 0.0) * g.remifentanil_assist
        remifentanil = self.weight * (g.remifentanil_base_ml_kg_h + assist)
        return np.clip(propofol, 0, MAX_RATE_ML_H), np.clip(remifentanil, 0, MAX_RATE_ML_H)
