"""The simulated anesthesiologist: the behaviour policy behind every anesthesia dataset.

TIVA as practised by hand, with human habits so the data holds good and poor decisions:
a propofol induction bolus at the pump's top rate, remifentanil from the start, then titration
of propofol towards BIS 40-60 in coarse steps, acting on a stale BIS sometimes and not at all
other times; remifentanil raised when surgery stimulates (MAP or HR up), propofol and
remifentanil cut on hypotension (MAP < 65), and now and then an unexplained change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dosewise.sim.anesthesia.cases import (
    MAX_RATE_ML_H,
    PROPOFOL_MG_PER_ML,
    REMIFENTANIL_UG_PER_ML,
    VITALS,
    CaseCohort,
    CaseHistory,
    CaseSpec,
    run_cases,
    sample_cases,
)


@dataclass(frozen=True)
class AnesthesiologistHabits:
    induction_mg_kg: tuple[float, float] = (1.5, 2.5)  # propofol bolus, per clinician
    maintenance_ug_kg_min: tuple[float, float] = (80.0, 150.0)  # starting propofol infusion
    remifentanil_ug_kg_min: tuple[float, float] = (0.05, 0.2)  # starting remifentanil infusion
    bis_band: tuple[float, float] = (40.0, 60.0)
    propofol_step_ml_h: int = 5  # pumps are turned in coarse steps
    reaction_delay_prob: float = 0.3  # looks at the previous BIS instead of the current one
    inertia_prob: float = 0.4  # leaves an out-of-band BIS alone this minute
    stimulation_ratio: float = 1.2  # MAP or HR above this x pre-induction -> more remifentanil
    remifentanil_step_ml_h: int = 10
    hypotension_map: float = 65.0
    hypotension_response_prob: float = 0.7
    hypotension_cut: float = 0.25  # fraction of both rates removed on hypotension
    deviation_prob: float = 0.03  # an unexplained propofol change of up to +-20 mL/h


class SimulatedAnesthesiologist:
    """Stateful policy for one cohort; each case gets its own clinician style."""

    def __init__(self, cohort: CaseCohort, seed: int, habits: AnesthesiologistHabits = AnesthesiologistHabits(), step_s: int = 60):
        self.habits, self.step_s = habits, step_s
        self.rng = np.random.default_rng(seed)
        n, weight = cohort.n, cohort.covariates.weight
        per_ml_h = lambda per_kg_min, conc: per_kg_min * weight * 60.0 / conc
        self.propofol = np.rint(per_ml_h(self.rng.uniform(*habits.maintenance_ug_kg_min, n) / 1000.0, PROPOFOL_MG_PER_ML))
        self.remifentanil = np.rint(per_ml_h(self.rng.uniform(*habits.remifentanil_ug_kg_min, n), REMIFENTANIL_UG_PER_ML))
        bolus_mg = self.rng.uniform(*habits.induction_mg_kg, n) * weight
        top_rate_mg_per_step = MAX_RATE_ML_H * PROPOFOL_MG_PER_ML / 3600.0 * step_s
        self.induction_steps = np.ceil(bolus_mg / top_rate_mg_per_step).astype(int)

    def __call__(self, history: CaseHistory) -> tuple[np.ndarray, np.ndarray]:
        h, rng, t = self.habits, self.rng, history.t
        n = history.vitals.shape[0]
        inducing = t < self.induction_steps
        if t == 0:
            return np.where(inducing, MAX_RATE_ML_H, self.propofol), self.remifentanil.copy()
        now, before, awake = history.vitals[:, -1], history.vitals[:, max(t - 1, 0)], history.vitals[:, 0]
        bis = np.where(rng.random(n) < h.reaction_delay_prob, before[:, 0], now[:, 0])
        lo, hi = h.bis_band
        steps = np.ceil(np.abs(bis - 50.0) / 10.0)  # bigger misses, bigger turns
        change = np.where(bis > hi, steps, np.where(bis < lo, -steps, 0.0)) * h.propofol_step_ml_h
        change = np.where(rng.random(n) < h.inertia_prob, 0.0, change)
        change = np.where(rng.random(n) < h.deviation_prob, rng.integers(-4, 5, n) * 5.0, change)
        propofol = self.propofol + change
        stimulated = (now[:, 1] > h.stimulation_ratio * awake[:, 1]) | (now[:, 4] > h.stimulation_ratio * awake[:, 4])
        remifentanil = self.remifentanil + h.remifentanil_step_ml_h * (stimulated & (rng.random(n) < 0.6))
        hypotensive = (now[:, 1] < h.hypotension_map) & (rng.random(n) < h.hypotension_response_prob)
        propofol = np.where(hypotensive, propofol * (1.0 - h.hypotension_cut), propofol)
        remifentanil = np.where(hypotensive, remifentanil * (1.0 - h.hypotension_cut), remifentanil)
        self.propofol = np.clip(np.rint(propofol), 0, MAX_RATE_ML_H)
        self.remifentanil = np.clip(np.rint(remifentanil), 0, MAX_RATE_ML_H)
        return np.where(inducing, MAX_RATE_ML_H, self.propofol), self.remifentanil.copy()


def simulate_cases(n_cases: int, seed: int, spec: CaseSpec = CaseSpec()) -> pd.DataFrame:
    """A VitalDB-like table, one row per case per decision step.

    Columns: case_id, time (s), BIS, MAP, SBP, DBP, HR (charted before the decision),
    PPF20_RATE and RFTN20_RATE (mL/h chosen at that time), age, sex, height, weight, asa.
    """
    seeds = np.random.SeedSequence(seed).spawn(3)
    cohort = sample_cases(n_cases, np.random.default_rng(seeds[0]), spec)
    clinician = SimulatedAnesthesiologist(cohort, int(seeds[1].generate_state(1)[0]), step_s=spec.step_s)
    traj = run_cases(cohort, clinician, int(seeds[2].generate_state(1)[0]), spec)
    k_idx, c_idx = np.nonzero(traj.mask)
    order = np.lexsort((k_idx, c_idx))
    k_idx, c_idx = k_idx[order], c_idx[order]
    frame = pd.DataFrame({"case_id": c_idx + 1, "time": k_idx * spec.step_s})
    for j, name in enumerate(VITALS):
        frame[name] = np.round(traj.vitals[k_idx, c_idx, j], 1)
    frame["PPF20_RATE"] = traj.rates[k_idx, c_idx, 0]
    frame["RFTN20_RATE"] = traj.rates[k_idx, c_idx, 1]
    cov = cohort.covariates
    frame["age"] = np.round(cov.age[c_idx]).astype(int)
    frame["sex"] = cov.sex[c_idx].astype(int)
    frame["height"] = np.round(cov.height[c_idx], 1)
    frame["weight"] = np.round(cov.weight[c_idx], 1)
    frame["asa"] = cohort.asa[c_idx]
    return frame
