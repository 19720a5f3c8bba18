"""Model-informed dosing as a closed-loop policy: what a pharmacist running MAP-Bayesian software would do.

At every decision it rebuilds each patient's dosing record from the chart (the administrations given,
the levels measured, the covariates and the latest creatinine), fits the patient's PK to those levels
(`map_estimate`, all patients at once) and asks for the maintenance dose that gives the target AUC24
at the patient's current interval: over the next day from the next administration with the drug already
on board (the default), or at steady state (`dose_for_target_auc`).

Two ways to act on that dose:
- through the learned policy's action space (``free_regimen=False``): a = `action_for_dose` (regimen
  dose, target), so the regimen moves by at most +-50 % per 4 h decision, exactly the limits a learned
  policy has; the comparison is then about the decisions, not about the freedom to make them;
- setting the regimen freely (``free_regimen=True``): the target dose is written directly, as a
  pharmacist's order would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dosewise.algos.bayesian_dosing import DosingRecord, PKEstimate, action_for_dose, dose_for_target_auc, map_estimate, predict
from dosewise.sim.vancomycin import FEATURES, NORMAL_VALUES, ChartRecord, VancomycinConfig

LEVEL, CREATININE = FEATURES.index("vanco_level"), FEATURES.index("creatinine")
# Up to this many levels a patient is fitted from every start point (a few levels can fit two ways);
# with more, from its previous estimate (warm start), which is about five times cheaper.
COLD_FIT_LEVELS = 3
AIMS = ("steady_state", "next_window")


def _last_charted(values: np.ndarray, default: float) -> np.ndarray:
    """Latest non-missing value per patient of ``values`` [T, N]; ``default`` where none was charted."""
    seen = np.isfinite(values)
    last = np.where(seen.any(axis=0), values.shape[0] - 1 - np.argmax(seen[::-1], axis=0), -1)
    return np.where(last >= 0, values[np.maximum(last, 0), np.arange(values.shape[1])], default)


def _first_charted(values: np.ndarray, default: float) -> np.ndarray:
    """First non-missing value per patient of ``values`` [T, N] (the admission value); ``default`` where none."""
    seen = np.isfinite(values)
    first = np.argmax(seen, axis=0)
    return np.where(seen.any(axis=0), values[first, np.arange(values.shape[1])], default)


def dosing_records(record: ChartRecord) -> list[DosingRecord]:
    """Each patient's `DosingRecord` from the chart: every administration, every charted level at its
    observation hour (uncharted rows left out; readings at the LLOQ stay as reported, so the estimator
    censors them), and the covariates with the latest charted creatinine (the admission value as baseline)."""
    charted = record.charted  # [T, N, 7]
    creatinine = _last_charted(charted[:, :, CREATININE], float(NORMAL_VALUES[CREATININE]))
    baseline = _first_charted(charted[:, :, CREATININE], float(NORMAL_VALUES[CREATININE]))
    levels = charted[:, :, LEVEL]
    records = []
    for i in range(record.n):
        given = record.administrations[i]
        measured = np.isfinite(levels[:, i])
        records.append(
            DosingRecord(
                dose_start_h=given[:, 0],
                dose_mg=given[:, 1],
                infusion_h=given[:, 2],
                sample_h=record.observation_hours[measured],
                level_mg_l=levels[measured, i],
                age=float(record.age[i]),
                weight_kg=float(record.weight_kg[i]),
                creatinine=float(creatinine[i]),
                male=bool(record.sex[i] == 1),
                dialysis=bool(record.dialysis[i] == 1),
                creatinine_baseline=float(baseline[i]),
            )
        )
    return records


@dataclass
class BayesianDosingPolicy:
    """MAP-Bayesian dosing for `rollout`: called ``policy(obs, record)`` (it declares ``needs_record``).

    Stateful within one course: a patient is re-fitted only when a new level or creatinine was charted,
    otherwise the previous estimate stands. The state resets at the first decision of a rollout, so one
    object can treat several cohorts one after another (not two at once).
    """

    # AUC24 aimed at, mg*h/L (the middle of the 400-600 target).
    target_auc24: float = 500.0
    # "next_window": the dose whose mean daily AUC over max(24 h, interval) from the next administration
    # is the target, drug on board included (re-planned every decision, it settles on the steady-state dose);
    # "steady_state": the dose whose steady-state AUC24 is the target (`dose_for_target_auc`), which a
    # two-compartment patient reaches only after days: it under-doses the first days of a short course.
    aim: str = "next_window"
    # False: act through the learned policy's action space (at most +-max_change per decision);
    # True: write the target dose directly (`rollout` then reads the returned mg, see `returns_dose_mg`).
    free_regimen: bool = False
    # Doses rounded to this many mg (e.g. 250 mg vials); None keeps them exact.
    round_to: float | None = None
    # The simulator's configuration: its population PK is the prior, its regimen the dose limits.
    config: VancomycinConfig = field(default_factory=VancomycinConfig)
    # Cap on Newton steps per patient and start (`map_estimate`).
    iterations: int = 40

    needs_record = True

    def __post_init__(self) -> None:
        if self.aim not in AIMS:
            raise ValueError(f"BayesianDosingPolicy.aim: expected one of {', '.join(AIMS)}, got {self.aim!r}")
        if self.target_auc24 <= 0:
            raise ValueError(f"BayesianDosingPolicy.target_auc24: expected > 0 mg*h/L, got {self.target_auc24}")
        self._estimate: PKEstimate | None = None
        self._charted_counts: np.ndarray | None = None
        self.fits = 0  # patient fits made so far (for the re-estimation rule's tests)

    @property
    def returns_dose_mg(self) -> bool:
        return self.free_regimen

    @property
    def label(self) -> str:
        return "Bayesian (free regimen)" if self.free_regimen else "Bayesian (action space)"

    def estimate(self, record: ChartRecord, records: list[DosingRecord] | None = None) -> PKEstimate:
        """Every patient's current MAP estimate, re-fitting only those with a new level or creatinine
        (``records``: `dosing_records` of ``record``, if already built)."""
        counts = np.isfinite(record.charted[:, :, [LEVEL, CREATININE]]).sum(axis=0)  # [N, 2] values charted so far
        previous = self._estimate
        if previous is None or record.charted.shape[0] == 1 or self._charted_counts.shape != counts.shape:
            previous, cold, warm = None, np.arange(record.n), np.zeros(0, dtype=np.int64)
        else:
            refit = np.flatnonzero((counts != self._charted_counts).any(axis=1))
            cold, warm = refit[counts[refit, 0] <= COLD_FIT_LEVELS], refit[counts[refit, 0] > COLD_FIT_LEVELS]
        if cold.size or warm.size:
            records = dosing_records(record) if records is None else records
            estimate = previous
            for rows, start in ((cold, None), (warm, None if previous is None else previous.eta[warm])):
                if rows.size:
                    fitted = map_estimate([records[i] for i in rows], self.config.pk, self.iterations, initial_eta=start)
                    estimate = fitted if estimate is None else _merge(estimate, fitted, rows)
            self._estimate = estimate
            self.fits += int(cold.size + warm.size)
        self._charted_counts = counts
        return self._estimate

    def target_dose(self, record: ChartRecord) -> np.ndarray:
        """Maintenance dose per administration [N] for the target AUC24 at each patient's interval."""
        reg = self.config.regimen
        records = dosing_records(record)
        estimate = self.estimate(record, records)
        dose = dose_for_target_auc(estimate, record.interval_h, self.target_auc24, reg.min_dose_mg, reg.max_dose_mg)
        if self.aim == "next_window":
            dose = np.clip(self._window_dose(estimate, records, record, dose), reg.min_dose_mg, reg.max_dose_mg)
        if self.round_to is not None:
            dose = np.clip(np.round(dose / self.round_to) * self.round_to, reg.min_dose_mg, reg.max_dose_mg)
        return dose

    def _window_dose(self, estimate: PKEstimate, records: list[DosingRecord], record: ChartRecord, guess: np.ndarray) -> np.ndarray:
        """The dose giving the target mean daily AUC over max(24 h, interval) from the next administration,
        drug on board included: two secant steps on `predict` from the steady-state dose ``guess`` (the AUC
        is linear in the dose but for the whole-hour infusion lengths)."""
        rate = self.config.regimen.max_rate_mg_h
        interval = record.interval_h
        first = np.ceil(record.hour / interval) * interval  # doses due at the decision hour are given after it
        window = np.maximum(24.0, interval)
        dose = guess.copy()
        for hours in np.unique(window):  # `predict` takes one window length per call
            rows = np.flatnonzero(window == hours)
            sub = PKEstimate(**{name: getattr(estimate, name)[rows] for name in PKEstimate.__dataclass_fields__})
            chart = [records[i] for i in rows]
            carried = predict(sub, chart, np.zeros(rows.size), interval[rows], first[rows], float(hours), rate).auc24
            trial = guess[rows]
            for _ in range(2):
                per_mg = (predict(sub, chart, trial, interval[rows], first[rows], float(hours), rate).auc24 - carried) / trial
                trial = np.maximum((self.target_auc24 - carried) / per_mg, 1.0)
            dose[rows] = trial
        return dose

    def __call__(self, obs: np.ndarray, record: ChartRecord) -> np.ndarray:
        """[N] doses in mg (free regimen) or actions in [-1, 1] (action space)."""
        if obs.shape[0] != record.n:
            raise ValueError(f"BayesianDosingPolicy: {obs.shape[0]} observation rows but the record has {record.n} patients")
        target = self.target_dose(record)
        if self.free_regimen:
            return target
        return action_for_dose(record.dose_mg, target, self.config.regimen.max_change)


def _merge(previous: PKEstimate, fitted: PKEstimate, rows: np.ndarray) -> PKEstimate:
    """``previous`` with patients ``rows`` replaced by ``fitted``."""
    merged = {}
    for name in PKEstimate.__dataclass_fields__:
        value = getattr(previous, name).copy()
        value[rows] = getattr(fitted, name)
        merged[name] = value
    return PKEstimate(**merged)
