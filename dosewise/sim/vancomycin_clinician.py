"""The simulated clinician: the behaviour policy behind every vancomycin dataset.

Trough-era practice with human habits, so the data holds good and poor decisions and covers
some but not all actions: the clinician aims the measured level at 10-15 mg/L (15-20 for
serious infections, which on the Goti model often means AUC24 > 600 and more AKI), reads a
level drawn at any time of the dosing interval as if it were a trough, sometimes acts on the
previous level (reaction delay), sometimes leaves an out-of-range level alone (inertia),
sometimes cuts the dose when creatinine has risen, and now and then goes off protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dosewise.sim.vancomycin import (
    DECISION_HOURS,
    DOSE_FEATURES,
    FEATURES,
    Cohort,
    VancomycinConfig,
    rollout,
    sample_cohort,
)


@dataclass(frozen=True)
class ClinicianHabits:
    target_non_serious: tuple[float, float] = (10.0, 15.0)  # mg/L, measured level aimed at
    target_serious: tuple[float, float] = (15.0, 20.0)
    base_change: float = 0.3  # action for a level just outside the band
    change_per_mg_l: float = 0.1  # extra action per mg/L outside the band
    gain_range: tuple[float, float] = (0.7, 1.3)  # per-patient clinician gain, uniform
    reaction_delay_prob: float = 0.3  # acts on the previous level instead of the current one
    inertia_prob: float = 0.25  # leaves an out-of-range level alone this time
    creatinine_alarm_ratio: float = 1.5  # creatinine / first creatinine that prompts a cut
    creatinine_cut: float = 0.4
    creatinine_response_prob: float = 0.5
    deviation_prob: float = 0.08  # off-protocol decision, uniform in [-1, 1]
    noise_sd: float = 0.1
    resolution: float = 0.05  # actions are charted on this grid


class VancomycinClinician:
    """Stateful behaviour policy for one cohort: remembers the previous level and the first creatinine."""

    def __init__(self, cohort: Cohort, seed: int, habits: ClinicianHabits = ClinicianHabits()):
        self.habits = habits
        self.rng = np.random.default_rng(seed)
        lo, hi = np.array(habits.target_non_serious), np.array(habits.target_serious)
        self.low = np.where(cohort.serious, hi[0], lo[0])
        self.high = np.where(cohort.serious, hi[1], lo[1])
        self.gain = self.rng.uniform(*habits.gain_range, cohort.n)
        self.previous_level: np.ndarray | None = None
        self.first_creatinine: np.ndarray | None = None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h, rng = self.habits, self.rng
        n = obs.shape[0]
        level, creatinine = obs[:, 0], obs[:, 1]
        if self.previous_level is None:
            self.previous_level, self.first_creatinine = level.copy(), creatinine.copy()
        seen = np.where(rng.random(n) < h.reaction_delay_prob, self.previous_level, level)
        self.previous_level = level.copy()
        above = np.maximum(seen - self.high, 0.0)
        below = np.maximum(self.low - seen, 0.0)
        action = np.where(above > 0, -(h.base_change + h.change_per_mg_l * above), 0.0)
        action = np.where(below > 0, h.base_change + h.change_per_mg_l * below, action)
        action = action * self.gain
        action = np.where(rng.random(n) < h.inertia_prob, 0.0, action)
        kidney_alarm = (creatinine >= h.creatinine_alarm_ratio * self.first_creatinine) & (rng.random(n) < h.creatinine_response_prob)
        action = action - h.creatinine_cut * kidney_alarm
        action = action + rng.normal(0.0, h.noise_sd, n)
        action = np.where(rng.random(n) < h.deviation_prob, rng.uniform(-1.0, 1.0, n), action)
        return np.round(np.clip(action, -1.0, 1.0) / h.resolution) * h.resolution


# Dose-aware columns written as they are; the others (interval, hours, dialysis) are whole numbers.
_CONTINUOUS = frozenset({"dose_mg", "weight_kg", "age"})

# Decimal places a chart keeps per feature.
_CHART_DECIMALS = {"vanco_level": 1, "creatinine": 2, "wbc": 1, "bun": 0, "temperature": 1, "sbp": 0, "heart_rate": 0}


def simulate_dataset(
    n_patients: int,
    seed: int,
    config: VancomycinConfig = VancomycinConfig(),
    habits: ClinicianHabits = ClinicianHabits(),
) -> pd.DataFrame:
    """A clinical-export-like table, one row per patient per 4 h step.

    Columns: patient_id, time (h), the 7 charted features (NaN where not charted), the dose-aware
    columns of DOSE_FEATURES (exact, never missing; ``dose_mg`` is the regimen before the row's
    action, so the next row's is ``clip(dose_mg * (1 + 0.5 * action))``), sex (1 male, 0 female:
    not part of the state, but Cockcroft-Gault needs it), loading_dose_mg (the first administration, for
    rebuilding the dosing record), action, reward.

    Row time t is simulator hour t + 4: the first (loading) dose started 4 h before the first row,
    so a row's last administration started ``hours_since_dose`` hours before its time.
    """
    seeds = np.random.SeedSequence(seed).spawn(3)
    cohort = sample_cohort(n_patients, np.random.default_rng(seeds[0]), config)
    clinician = VancomycinClinician(cohort, int(seeds[1].generate_state(1)[0]), habits)
    traj = rollout(cohort, clinician, int(seeds[2].generate_state(1)[0]), config)
    t_idx, p_idx = np.nonzero(traj.mask)
    order = np.lexsort((t_idx, p_idx))
    t_idx, p_idx = t_idx[order], p_idx[order]
    width = max(4, len(str(n_patients)))
    frame = pd.DataFrame({"patient_id": [f"V{i + 1:0{width}d}" for i in p_idx], "time": t_idx * DECISION_HOURS})
    obs = traj.observations[t_idx, p_idx]
    for j, name in enumerate(FEATURES):
        frame[name] = np.round(obs[:, j], _CHART_DECIMALS[name])
    dose_state = traj.dose_state[t_idx, p_idx]
    for j, name in enumerate(DOSE_FEATURES):
        frame[name] = dose_state[:, j] if name in _CONTINUOUS else dose_state[:, j].astype(np.int64)
    frame["sex"] = cohort.sex[p_idx].astype(np.int64)
    frame["loading_dose_mg"] = cohort.loading_mg[p_idx].astype(np.float64)
    frame["action"] = np.round(traj.actions[t_idx, p_idx], 3)
    frame["reward"] = np.round(traj.rewards[t_idx, p_idx], 4)
    return frame
