"""Surgical cases: a cohort, its surgical stimulation, the monitors, and a case runner at 1 s.

The patient model is ``dosewise.sim.anesthesia`` (PK/PD from the literature, PAS as oracle).
This module adds what a case needs on top: who the patients are, when surgery stimulates them,
what the monitors chart (BIS, MAP, SBP, DBP, HR), pumps in VitalDB units, and one runner that
every policy goes through - the simulated anesthesiologist that writes the datasets, a PID
controller, and learned planners - so they are compared on identical patients and luck.

MAP calibration: with PAS's defaults MAP falls to ~48 mmHg at a normal depth.
Two causes, two documented choices: (1) PAS forms propofol's MAP Emax as DAP + (SAP + DAP)/3 =
42.4 mmHg; the MAP of a (SAP, DAP) pair is DAP + (SAP - DAP)/3 = 30.3 mmHg (Jeleazcov 2015's
Emax values), which we use for cases; (2) awake baseline MAP is drawn per patient, 100 mmHg at
40 years + 0.3 per year, SD 8 (pre-induction MAP of anxious, unpremedicated surgical adults),
instead of PAS's fixed 90. Under the simulated anesthesiologist a case's median maintenance MAP
then averages 76 mmHg and MAP is below 65 about 15 % of the time (bench/anesthesia_baselines.py). ``open_loop`` keeps PAS's values so the oracle tests still compare like with like.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from dosewise.sim.anesthesia.compartments import discretise
from dosewise.sim.anesthesia.covariates import Covariates
from dosewise.sim.anesthesia.pd import HemoParams
from dosewise.sim.anesthesia.pk_propofol import PROPOFOL_MODELS
from dosewise.sim.anesthesia.pk_remifentanil import REMIFENTANIL_MODELS
from dosewise.sim.anesthesia.simulator import AnesthesiaSimulator

PROPOFOL_MG_PER_ML = 20.0  # Orchestra PPF20: propofol 2 % = 20 mg/mL
REMIFENTANIL_UG_PER_ML = 20.0  # Orchestra RFTN20: remifentanil 20 ug/mL
MAX_RATE_ML_H = 200  # pump rates are integers 0..200 mL/h: the planner's 201 levels
VITALS = ("BIS", "MAP", "SBP", "DBP", "HR")


def propofol_mg_s(rate_ml_h: np.ndarray) -> np.ndarray:
    return np.asarray(rate_ml_h, dtype=float) * PROPOFOL_MG_PER_ML / 3600.0


def remifentanil_ug_s(rate_ml_h: np.ndarray) -> np.ndarray:
    return np.asarray(rate_ml_h, dtype=float) * REMIFENTANIL_UG_PER_ML / 3600.0


# What `pump_concentrations` returns per step, in this order (µg/mL propofol, ng/mL remifentanil).
PUMP_CONCENTRATIONS: tuple[str, ...] = ("cp_propofol", "ce_propofol", "cp_remifentanil", "ce_remifentanil")


def pump_concentrations(
    covariates: Covariates,
    rates_ml_h: np.ndarray,
    step_s: float,
    propofol_model: str = "Schnider",
    remifentanil_model: str = "Minto",
) -> np.ndarray:
    """The plasma and BIS effect-site concentrations a TCI pump displays: the population model's
    typical patient for these covariates (no between-patient variability), given every rate of
    the case so far. A model that reads them sees the whole infusion history, not just its window.

    rates_ml_h [N, T, 2] (propofol, remifentanil mL/h, each held one step of `step_s` seconds from
    a drug-free start) -> [N, T + 1, 4] float64 in `PUMP_CONCENTRATIONS` order, row s the state
    after s steps. Exact zero-order-hold steps, as the simulator takes them.
    """
    rates = np.asarray(rates_ml_h, dtype=np.float64)
    if rates.ndim != 3 or rates.shape[0] != covariates.n or rates.shape[2] != 2:
        raise ValueError(f"rates_ml_h must be [{covariates.n}, T, 2], got {list(rates.shape)}")
    out = np.zeros((covariates.n, rates.shape[1] + 1, 4))
    drugs = ((PROPOFOL_MODELS, propofol_model, propofol_mg_s), (REMIFENTANIL_MODELS, remifentanil_model, remifentanil_ug_s))
    for drug, (models, name, per_s) in enumerate(drugs):
        phi, gamma = discretise(models[name].typical(covariates), float(step_s))  # [N, S, S], [N, S]
        u = per_s(rates[..., drug])  # [N, T]
        x = np.zeros(gamma.shape)  # central, two peripherals, effect sites (the BIS site first)
        for s in range(rates.shape[1]):
            x = np.einsum("nij,nj->ni", phi, x) + gamma * u[:, s, None]
            out[:, s + 1, 2 * drug], out[:, s + 1, 2 * drug + 1] = x[:, 0], x[:, 3]
    return out


@dataclass(frozen=True)
class CaseSpec:
    """Adult elective surgery under TIVA."""

    duration_min: tuple[float, float] = (60.0, 240.0)  # uniform
    step_s: int = 60  # decision step; the patient model runs at 1 s underneath
    map_base_mean: float = 100.0  # mmHg at age 40, awake before induction (anxious, unpremedicated)
    map_base_per_year: float = 0.3  # mmHg per year of age
    map_base_sd: float = 8.0
    hr_base: tuple[float, float] = (75.0, 10.0)  # bpm, mean and SD
    stimulation_every_min: float = 20.0  # mean gap between surgical stimulation peaks after incision
    # A shifted population (robustness checks): age and BMI drawn uniformly from these ranges
    # instead of the general-surgery distribution, and the BIS response surface's C50 of both
    # drugs divided by `pd_sensitivity` (> 1: a more sensitive patient, as the elderly are).
    age_range: tuple[float, float] | None = None
    bmi_range: tuple[float, float] | None = None
    pd_sensitivity: float = 1.0


# The shifted cohort of the planner benches: elderly (70-90), obese (BMI 30-40), 30 % more
# sensitive to both hypnotics.
SHIFTED_SPEC = CaseSpec(age_range=(70.0, 90.0), bmi_range=(30.0, 40.0), pd_sensitivity=1.3)


@dataclass(frozen=True)
class CaseCohort:
    """N cases. Arrays are [N]; ``events`` hold the stimulation schedule [N, E]."""

    covariates: Covariates
    asa: np.ndarray  # ASA physical status 1..3
    duration_s: np.ndarray  # multiple of the decision step
    map_base: np.ndarray  # mmHg awake
    hr_base: np.ndarray  # bpm awake
    event_start_s: np.ndarray  # [N, E]
    event_length_s: np.ndarray  # [N, E]
    event_bis: np.ndarray  # [N, E] BIS points added during the event
    event_map: np.ndarray  # [N, E] mmHg added during the event

    @property
    def n(self) -> int:
        return self.covariates.n


def sample_cases(n: int, rng: np.random.Generator, spec: CaseSpec = CaseSpec()) -> CaseCohort:
    """Covariates as in VitalDB's general-surgery adults; intubation, incision, then random stimulation."""
    sex = (rng.random(n) < 0.5).astype(float)
    age = np.clip(rng.normal(58, 14, n), 18, 85)
    height = np.clip(np.where(sex == 1, rng.normal(171, 7, n), rng.normal(158, 6, n)), 140, 200)
    bmi = np.clip(rng.normal(24, 3.5, n), 16, 40)
    if spec.age_range is not None:
        age = rng.uniform(*spec.age_range, n)
    if spec.bmi_range is not None:
        bmi = rng.uniform(*spec.bmi_range, n)
    weight = bmi * (height / 100.0) ** 2
    asa = np.clip(1 + (age > 50) + (rng.random(n) < 0.3), 1, 3).astype(int)
    duration = rng.uniform(*spec.duration_min, n) * 60.0
    duration = (np.round(duration / spec.step_s) * spec.step_s).astype(int)
    map_base = spec.map_base_mean + spec.map_base_per_year * (age - 40) + rng.normal(0, spec.map_base_sd, n)
    hr_base = rng.normal(*spec.hr_base, n)
    # Events: intubation at 4-6 min, incision at 10-20 min, then peaks every ~20 min until closure.
    n_random = int(np.ceil(spec.duration_min[1] / spec.stimulation_every_min)) + 1
    intubation = rng.uniform(240, 360, (n, 1))
    incision = rng.uniform(600, 1200, (n, 1))
    gaps = rng.exponential(spec.stimulation_every_min * 60.0, (n, n_random))
    later = incision + np.cumsum(gaps, axis=1)
    starts = np.concatenate([intubation, incision, later], axis=1)
    lengths = np.concatenate([np.full((n, 1), 120.0), rng.uniform(300, 900, (n, 1)), rng.uniform(120, 480, (n, n_random))], axis=1)
    size = rng.uniform(0.5, 1.5, starts.shape)
    event_bis = size * np.concatenate([np.full((n, 1), 15.0), np.full((n, 1), 10.0), np.full((n, n_random), 8.0)], axis=1)
    event_map = size * np.concatenate([np.full((n, 1), 20.0), np.full((n, 1), 15.0), np.full((n, n_random), 12.0)], axis=1)
    ends_after_case = starts + lengths > duration[:, None] - 600  # nothing stimulates during closure
    return CaseCohort(
        covariates=Covariates.from_arrays(age, height, weight, sex),
        asa=asa,
        duration_s=duration,
        map_base=map_base,
        hr_base=hr_base,
        event_start_s=starts,
        event_length_s=lengths,
        event_bis=np.where(ends_after_case, 0.0, event_bis),
        event_map=np.where(ends_after_case, 0.0, event_map),
    )


def stimulation(cohort: CaseCohort, time_s: float) -> np.ndarray:
    """Additive (BIS, MAP) [N, 2] at one time: each event ramps up in 30 s and fades over its last third."""
    t = time_s - cohort.event_start_s
    rise = np.clip(t / 30.0, 0.0, 1.0)
    fade = np.clip((cohort.event_length_s - t) / (cohort.event_length_s / 3.0), 0.0, 1.0)
    shape = rise * fade * (t >= 0)
    return np.stack([(shape * cohort.event_bis).sum(axis=1), (shape * cohort.event_map).sum(axis=1)], axis=1)


def case_hemodynamics(cohort: CaseCohort) -> HemoParams:
    """PAS's MAP/CO model with the two calibrations of the module docstring."""
    typical = HemoParams.typical(cohort.n)
    emax_map = typical.emax_propo_dap + (typical.emax_propo_sap - typical.emax_propo_dap) / 3.0
    # HemoParams forms DAP + (SAP + DAP)/3 from these two; choose SAP so that it yields emax_map.
    sap = 3.0 * (emax_map - typical.emax_propo_dap) - typical.emax_propo_dap
    return replace(typical, map_base=cohort.map_base, emax_remi_map=-cohort.map_base, emax_propo_sap=sap)


def monitors(cohort: CaseCohort, bis: np.ndarray, mean_ap: np.ndarray, ce_remi: np.ndarray, stim: np.ndarray) -> np.ndarray:
    """Charted (BIS, MAP, SBP, DBP, HR) [N, 5].

    PAS has no heart rate: HR falls with remifentanil (up to 20 % at high effect-site levels,
    half effect at 4 ng/mL) and rises with stimulation (0.5 bpm per mmHg of stimulation MAP).
    SBP and DBP split MAP with a pulse pressure widening with age (MAP = DBP + PP/3).
    """
    opioid = ce_remi**2 / (4.0**2 + ce_remi**2)
    hr = cohort.hr_base * (1.0 - 0.2 * opioid) + 0.5 * stim[:, 1]
    pulse = np.clip(35.0 + 0.4 * (cohort.covariates.age - 40.0), 30.0, 80.0) * np.clip(mean_ap / cohort.map_base, 0.5, 1.5)
    return np.stack([bis, mean_ap, mean_ap + 2.0 * pulse / 3.0, mean_ap - pulse / 3.0, hr], axis=1)


@dataclass(frozen=True)
class CaseHistory:
    """What a policy sees at decision step t: charted vitals up to now and its past pump rates."""

    t: int  # decision step index
    vitals: np.ndarray  # [N, t + 1, 5] BIS, MAP, SBP, DBP, HR (measured, with noise)
    rates: np.ndarray  # [N, t, 2] PPF20_RATE, RFTN20_RATE given so far (mL/h)
    cohort: CaseCohort


# A case policy maps the history to the next pump rates: two int arrays [N] in 0..200 mL/h.
CasePolicy = Callable[[CaseHistory], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CaseTrajectories:
    """One run of a cohort. Decision-step arrays are [S, N]; per-second truths are [S * step_s, N]."""

    vitals: np.ndarray  # [S, N, 5] charted at each decision (before acting)
    rates: np.ndarray  # [S, N, 2] int pump rates chosen at each decision
    bis_true: np.ndarray  # [S * step_s, N] noise-free BIS every second
    map_true: np.ndarray  # [S * step_s, N] noise-free MAP every second
    steps: np.ndarray  # [N] decision steps of each case
    step_s: int

    @property
    def mask(self) -> np.ndarray:
        """[S, N] True on real decision steps."""
        return np.arange(self.rates.shape[0])[:, None] < self.steps[None, :]

    @property
    def second_mask(self) -> np.ndarray:
        return np.arange(self.bis_true.shape[0])[:, None] < (self.steps * self.step_s)[None, :]


class CaseRun:
    """A cohort in surgery, one decision step at a time: `history()` is what a policy sees,
    `advance(ppf, rftn)` applies the rates for one decision step (the patient model at 1 s),
    `clone()` copies the whole state (patients, drug amounts, monitor-noise filter, random
    generator), so a what-if can branch off a case in progress. `run_cases` drives one.

    Patient variability and monitor noise come from ``seed`` alone (not from the policy), so two
    policies on the same cohort and seed treat the same patients with the same luck.
    """

    def __init__(
        self,
        cohort: CaseCohort,
        seed: int,
        spec: CaseSpec = CaseSpec(),
        propofol_model: str = "Schnider",
        remifentanil_model: str = "Minto",
    ) -> None:
        rng = np.random.default_rng(seed)
        self.sim = AnesthesiaSimulator(
            cohort.covariates,
            1.0,
            propofol_model,
            remifentanil_model,
            variability=True,
            noise=True,
            rng=rng,
            hemo=case_hemodynamics(cohort),
        )
        if spec.pd_sensitivity != 1.0:
            p = self.sim.bis_params
            self.sim.bis_params = replace(p, c50p=p.c50p / spec.pd_sensitivity, c50r=p.c50r / spec.pd_sensitivity)
        self.cohort, self.spec = cohort, spec
        n, step_s = cohort.n, spec.step_s
        self.steps = cohort.duration_s // step_s
        self.horizon = int(self.steps.max())
        self.vitals = np.zeros((self.horizon, n, len(VITALS)))
        self.rates = np.zeros((self.horizon, n, 2), dtype=np.int64)
        self.bis_true = np.zeros((self.horizon * step_s, n), dtype=np.float32)
        self.map_true = np.zeros((self.horizon * step_s, n), dtype=np.float32)
        self.vitals[0] = monitors(cohort, np.full(n, 97.4), cohort.map_base, np.zeros(n), np.zeros((n, 2)))
        self.noise = self.sim.noise  # monitor noise, applied by hand on the charted values
        self.sim.noise = None  # the simulator returns noise-free values; truths are recorded from them
        self.k = 0  # the next decision step

    @property
    def done(self) -> bool:
        return self.k >= self.horizon

    def history(self) -> CaseHistory:
        k = self.k
        return CaseHistory(t=k, vitals=self.vitals[: k + 1].transpose(1, 0, 2), rates=self.rates[:k].transpose(1, 0, 2), cohort=self.cohort)

    def advance(self, ppf: np.ndarray, rftn: np.ndarray) -> None:
        """Hold the rates (mL/h, rounded and clipped to the pump's 0..200) for one decision step."""
        k, step_s, n = self.k, self.spec.step_s, self.cohort.n
        ppf = np.clip(np.rint(np.asarray(ppf)), 0, MAX_RATE_ML_H).astype(np.int64)
        rftn = np.clip(np.rint(np.asarray(rftn)), 0, MAX_RATE_ML_H).astype(np.int64)
        self.rates[k] = np.stack([np.broadcast_to(ppf, (n,)), np.broadcast_to(rftn, (n,))], axis=1)
        u_p, u_r = propofol_mg_s(self.rates[k, :, 0]), remifentanil_ug_s(self.rates[k, :, 1])
        for s in range(step_s):
            second = k * step_s + s
            stim = stimulation(self.cohort, second + 1.0)
            obs = self.sim.step(u_p, u_r, np.concatenate([stim, np.zeros((n, 1))], axis=1))
            self.bis_true[second], self.map_true[second] = obs.bis, obs.map
            e_bis, e_map, _ = self.noise.sample()
        if k + 1 < self.horizon:
            charted = monitors(self.cohort, np.clip(obs.bis + e_bis, 0.0, 100.0), obs.map + e_map, obs.ce_remifentanil, stim)
            self.vitals[k + 1] = charted
        self.k += 1

    def clone(self) -> CaseRun:
        return copy.deepcopy(self)

    def reseed(self, seed: int) -> None:
        """Fresh monitor noise from here on (the patients stay who they are)."""
        rng = np.random.default_rng(seed)
        self.sim.rng = rng
        self.noise.rng = rng

    def trajectories(self) -> CaseTrajectories:
        return CaseTrajectories(
            vitals=self.vitals,
            rates=self.rates,
            bis_true=self.bis_true,
            map_true=self.map_true,
            steps=self.steps,
            step_s=self.spec.step_s,
        )


def run_cases(
    cohort: CaseCohort,
    policy: CasePolicy,
    seed: int,
    spec: CaseSpec = CaseSpec(),
    propofol_model: str = "Schnider",
    remifentanil_model: str = "Minto",
) -> CaseTrajectories:
    """Run ``policy`` on every case: decisions every ``spec.step_s`` s, the patient model at 1 s
    (`CaseRun`; same seed, same patients and monitor noise whatever the policy)."""
    run = CaseRun(cohort, seed, spec, propofol_model, remifentanil_model)
    while not run.done:
        run.advance(*policy(run.history()))
    return run.trajectories()
