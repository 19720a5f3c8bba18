"""Vancomycin ICU patients: population PK, kidney injury, infection, observations, reward.

The ground truth behind every vancomycin dataset of the project. Real TDM data never tells what
would have happened under another regimen; this simulator does, so learned policies can be
judged on outcomes instead of on their own value estimates.

Pharmacokinetics: Goti V, Chaturvedula A, Fossler MJ, Mok S, Jacob JT. Hospitalized patients
with and without hemodialysis have markedly different vancomycin pharmacokinetics: a population
pharmacokinetic model-based analysis. Ther Drug Monit 2018;40(2):212-221 (n = 1812).
Two compartments, zero-order infusions into the central one, solved exactly: the linear system
``d[Ac, Ap, AUC]/dt`` with a constant infusion over each 1 h sub-step is propagated with the
matrix exponential of its augmented 4x4 generator, for all patients at once.

Harm and benefit are scaled from Tsutsuura et al. 2021 (BMC Infect Dis 21:153), a meta-analysis:
trough >= 20 vs 15-20 mg/L -> AKI OR 2.39; AUC24 > ~600 -> AKI OR 2.10; AUC24/MIC >= 400 ->
treatment failure OR 0.28. Targets: 2020 ASHP/IDSA/PIDS/SIDP consensus, AUC24/MIC 400-600 (MIC 1).

Units: amounts mg, volumes L, clearances L/h, concentrations mg/L, time h, AUC mg*h/L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dosewise.sim.linalg import expm_batched

FEATURES: tuple[str, ...] = (
    "vanco_level",  # mg/L, measured at the decision time (not necessarily a trough)
    "creatinine",  # mg/dL
    "wbc",  # 10^3 cells/uL
    "bun",  # mg/dL
    "temperature",  # deg C
    "sbp",  # mmHg
    "heart_rate",  # beats/min
)
# The regimen and the covariates a dosing model needs, exact and never missing (the same names
# as `dosewise.data.schema.DOSE_FEATURES`, repeated here so the simulator does not import the data layer).
DOSE_FEATURES: tuple[str, ...] = (
    "dose_mg",  # maintenance dose per administration in force at the row, before the row's decision
    "interval_h",  # dosing interval, h
    "hours_since_dose",  # from the start of the last administration to the observation, h
    "weight_kg",
    "age",  # years
    "dialysis",  # 1 on dialysis
)
# What `rollout` can hand a policy, by name: the charted features, then the dose-aware ones.
OBSERVATION_NAMES: tuple[str, ...] = FEATURES + DOSE_FEATURES
DECISION_HOURS = 4  # one row / one decision every 4 h
SUBSTEP_HOURS = 1.0  # infusions start on whole hours; the PK solution is exact within a sub-step
AUC_TARGET = (400.0, 600.0)  # mg*h/L over 24 h, MIC 1 mg/L


@dataclass(frozen=True)
class GotiPK:
    """Goti 2018 final model (Table 3). CV% are converted to log-normal SDs: sqrt(ln(1+CV^2))."""

    cl_l_h: float = 4.5  # L/h at CrCL 120 mL/min, no dialysis
    cl_crcl_ref: float = 120.0  # mL/min
    cl_crcl_exp: float = 0.8  # power of (CrCL / 120)
    cl_dialysis_factor: float = 0.7  # multiplicative on CL when on dialysis
    vc_l: float = 58.4  # L at 70 kg
    vc_dialysis_factor: float = 0.5  # multiplicative on Vc when on dialysis
    vp_l: float = 38.4  # L at 70 kg
    q_l_h: float = 6.5  # L/h inter-compartmental clearance
    cv_cl: float = 0.398  # between-patient CV of CL
    cv_vc: float = 0.816  # between-patient CV of Vc
    cv_vp: float = 0.571  # between-patient CV of Vp
    sigma_add_mg_l: float = 3.4  # residual error, additive (mg/L)
    sigma_prop: float = 0.227  # residual error, proportional
    crcl_cap: float = 150.0  # mL/min, Cockcroft-Gault capped as in Goti 2018
    lloq_mg_l: float = 2.0  # assay lower limit of quantification: lower readings are reported as it


@dataclass(frozen=True)
class KidneyModel:
    """Exposure-driven AKI, at most one per patient; GFR falls, creatinine follows with a lag.
    Patients on dialysis have no kidney function left to injure (KDIGO does not apply), so they
    have no AKI and their creatinine stays at its pre-dialysis baseline.

    The per-step hazard is ``base_hazard * OR_auc**ramp((AUC24-600)/100) * OR_trough**ramp((trough-20)/5)``
    with ``ramp(x) = sigmoid(4x) + max(x, 0) / 2``: about the published odds ratio just past each
    threshold (OR ~ hazard ratio at these low risks) and rising further with exposure.
    """

    base_hazard_per_step: float = 0.003  # ~5 % AKI over 3 days at in-target exposure
    or_auc_over_600: float = 2.10  # Tsutsuura 2021
    or_trough_over_20: float = 2.39  # Tsutsuura 2021
    gfr_drop: tuple[float, float] = (0.4, 0.7)  # GFR multiplied by U(lo, hi) at an AKI event
    recovery_h: float = 72.0  # time constant of GFR recovery towards baseline
    creatinine_lag_h: float = 12.0  # serum creatinine follows GFR with this time constant


@dataclass(frozen=True)
class InfectionModel:
    """Infection severity S (0 = resolved, 1 = severe sepsis): logistic growth vs an Emax kill on AUC/MIC.

    With these values S smoulders near 0.4 at AUC24 ~ 250 and halves in ~1 day at AUC24 ~ 500; the kill
    saturates above 600, so more exposure buys little efficacy but more AKI.
    """

    growth_per_h: float = 0.02
    kill_per_h: float = 0.07
    auc50: float = 400.0  # AUC24/MIC giving half the maximal kill
    hill: float = 3.0
    mic_mg_l: float = 1.0


@dataclass(frozen=True)
class RewardWeights:
    """Per-step reward: ``in_target - under*(400-AUC)+/400 - over*(AUC-600)+/600 - aki*new_AKI``.

    AUC is the true rolling AUC24 at the end of the step (hidden from the policy); new_AKI is an
    injury that started during the step. Range about [-3, 1] per step, -10 more for an AKI.
    """

    in_target: float = 1.0
    under: float = 1.0
    over: float = 1.5
    aki: float = 10.0


@dataclass(frozen=True)
class Regimen:
    """Dose mapping. ``dose <- clip(dose * (1 + max_change * action), min, max)``: a = -1 halves the
    next doses, a = +1 raises them by half, a = 0 keeps the regimen. The interval never changes."""

    max_change: float = 0.5
    min_dose_mg: float = 125.0
    max_dose_mg: float = 4000.0
    max_rate_mg_h: float = 1000.0  # infusion speed limit (red-man syndrome); longer infusions for big doses

    def next_dose(self, dose_mg: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The dose per administration after actions (clipped to [-1, 1]) on the doses in force: [N] -> [N]."""
        action = np.clip(np.asarray(action, dtype=float), -1.0, 1.0)
        return np.clip(np.asarray(dose_mg, dtype=float) * (1.0 + self.max_change * action), self.min_dose_mg, self.max_dose_mg)


@dataclass(frozen=True)
class CohortSpec:
    """Adult ICU patients treated empirically with vancomycin."""

    age_mean: float = 62.0
    age_sd: float = 16.0
    male_frac: float = 0.6
    weight_median_male: float = 82.0  # kg
    weight_median_female: float = 70.0  # kg
    weight_log_sd: float = 0.2
    creatinine_median_male: float = 1.0  # mg/dL
    creatinine_median_female: float = 0.8
    creatinine_log_sd: float = 0.4
    dialysis_frac: float = 0.04  # on intermittent haemodialysis: ESRD creatinine, 48 h interval, always loaded
    dialysis_creatinine_median: float = 6.0  # mg/dL, pre-dialysis serum creatinine
    dialysis_creatinine_range: tuple[float, float] = (3.0, 12.0)  # mg/dL
    serious_frac: float = 0.5  # serious infections: loading dose, clinician aims at trough 15-20
    steps: tuple[int, int] = (8, 20)  # episode length in 4 h steps, uniform inclusive (mean ~56 h)
    missing_prob: float = 0.0008  # per feature and row: charted value missing


@dataclass(frozen=True)
class VancomycinConfig:
    pk: GotiPK = field(default_factory=GotiPK)
    kidney: KidneyModel = field(default_factory=KidneyModel)
    infection: InfectionModel = field(default_factory=InfectionModel)
    reward: RewardWeights = field(default_factory=RewardWeights)
    regimen: Regimen = field(default_factory=Regimen)
    cohort: CohortSpec = field(default_factory=CohortSpec)


@dataclass(frozen=True)
class Cohort:
    """N patients: covariates, hidden PK parameters and the starting regimen. Arrays are [N]."""

    age: np.ndarray  # years
    sex: np.ndarray  # 1 male, 0 female
    weight: np.ndarray  # kg
    creatinine_base: np.ndarray  # mg/dL
    dialysis: np.ndarray  # 1 on dialysis
    serious: np.ndarray  # bool, serious infection
    eta_cl: np.ndarray  # log-normal random effects
    eta_vc: np.ndarray
    eta_vp: np.ndarray
    severity0: np.ndarray  # infection severity at start
    sbp_base: np.ndarray  # mmHg without sepsis
    hr_base: np.ndarray  # bpm without sepsis
    interval_h: np.ndarray  # dosing interval (8, 12 or 24 h by CrCL; 48 h on dialysis)
    dose_mg: np.ndarray  # starting maintenance dose per administration
    loading_mg: np.ndarray  # first dose (loading dose for serious infections)
    steps: np.ndarray  # episode length in decision steps

    @property
    def n(self) -> int:
        return int(self.age.shape[0])

    def subset(self, index: np.ndarray | slice) -> Cohort:
        return Cohort(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def cockcroft_gault(age, weight, creatinine, sex, pk: GotiPK = GotiPK(), baseline=None) -> np.ndarray:
    """Creatinine clearance (mL/min) as Goti 2018 used it: SCr floored at 1 mg/dL above 60 years, capped.

    With ``baseline`` the floor applies to the patient's baseline creatinine and the current rise
    scales it, so an AKI lowers clearance in every patient (flooring the current value would hide
    a rise from 0.6 to 0.9 mg/dL in an older patient).
    """
    reference = creatinine if baseline is None else baseline
    scr = creatinine * np.where(age > 60, np.maximum(reference, 1.0) / reference, 1.0)
    crcl = (140.0 - age) * weight / (72.0 * scr) * np.where(sex == 1, 1.0, 0.85)
    return np.clip(crcl, 1.0, pk.crcl_cap)


def pk_parameters(cohort: Cohort, creatinine: np.ndarray, pk: GotiPK = GotiPK()):
    """Individual CL, Vc, Vp, Q for a serum creatinine (the steady state of the current GFR). Four [N] arrays."""
    crcl = cockcroft_gault(cohort.age, cohort.weight, creatinine, cohort.sex, pk, baseline=cohort.creatinine_base)
    wt = cohort.weight / 70.0
    cl = pk.cl_l_h * (crcl / pk.cl_crcl_ref) ** pk.cl_crcl_exp * pk.cl_dialysis_factor**cohort.dialysis
    vc = pk.vc_l * wt * pk.vc_dialysis_factor**cohort.dialysis
    vp = pk.vp_l * wt
    cl = cl * np.exp(cohort.eta_cl)
    vc = vc * np.exp(cohort.eta_vc)
    vp = vp * np.exp(cohort.eta_vp)
    return cl, vc, vp, np.full_like(cl, pk.q_l_h)


def transition_matrices(cl, vc, vp, q, dt: float):
    """Exact propagators of ``[Ac, Ap, AUC]`` over ``dt`` hours with a constant infusion u (mg/h).

    Returns ``phi [N, 3, 3]`` and ``gamma [N, 3]`` such that ``x(t+dt) = phi @ x(t) + gamma * u``;
    both come from the matrix exponential of the augmented generator ``[[A, b], [0, 0]] * dt``.
    """
    n = cl.shape[0]
    gen = np.zeros((n, 4, 4))
    gen[:, 0, 0] = -(cl + q) / vc
    gen[:, 0, 1] = q / vp
    gen[:, 1, 0] = q / vc
    gen[:, 1, 1] = -q / vp
    gen[:, 2, 0] = 1.0 / vc  # dAUC/dt = C = Ac / Vc
    gen[:, 0, 3] = 1.0  # infusion enters the central compartment
    prop = expm_batched(gen * dt)
    return prop[:, :3, :3], prop[:, :3, 3]


def sample_cohort(n: int, rng: np.random.Generator, config: VancomycinConfig = VancomycinConfig()) -> Cohort:
    """Draw N patients; the starting regimen is the hospital nomogram (15 mg/kg, interval by CrCL).

    Patients on dialysis get the 2020 consensus regimen for intermittent haemodialysis instead: a
    loading dose (25 mg/kg, at most 3 g) and 7.5 mg/kg every 48 h. Their creatinine is the same draw
    scaled to pre-dialysis values, so every random draw is the same whatever ``dialysis_frac`` is.
    """
    spec, pk = config.cohort, config.pk
    age = np.clip(rng.normal(spec.age_mean, spec.age_sd, n), 18, 95)
    sex = (rng.random(n) < spec.male_frac).astype(np.int64)
    w_med = np.where(sex == 1, spec.weight_median_male, spec.weight_median_female)
    weight = np.clip(w_med * np.exp(rng.normal(0, spec.weight_log_sd, n)), 40, 180)
    c_med = np.where(sex == 1, spec.creatinine_median_male, spec.creatinine_median_female)
    creatinine = np.clip(c_med * np.exp(rng.normal(0, spec.creatinine_log_sd, n)), 0.4, 4.0)
    dialysis = (rng.random(n) < spec.dialysis_frac).astype(np.int64)
    creatinine = np.where(
        dialysis == 1, np.clip(creatinine * spec.dialysis_creatinine_median / c_med, *spec.dialysis_creatinine_range), creatinine
    )
    serious = rng.random(n) < spec.serious_frac
    omega = lambda cv: np.sqrt(np.log1p(cv**2))
    eta_cl = rng.normal(0, omega(pk.cv_cl), n)
    eta_vc = rng.normal(0, omega(pk.cv_vc), n)
    eta_vp = rng.normal(0, omega(pk.cv_vp), n)
    severity0 = rng.uniform(0.4, 1.0, n)
    sbp_base = rng.normal(128, 12, n)
    hr_base = rng.normal(78, 8, n)
    crcl = cockcroft_gault(age, weight, creatinine, sex, pk)
    interval = np.select([dialysis == 1, crcl >= 100, crcl >= 50], [48, 8, 12], 24).astype(np.int64)
    round_250 = lambda mg: np.maximum(250.0, np.round(mg / 250.0) * 250.0)
    dose = np.where(dialysis == 1, round_250(7.5 * weight), round_250(15.0 * weight))
    loading = np.where(serious | (dialysis == 1), np.minimum(round_250(25.0 * weight), 3000.0), dose)
    steps = rng.integers(spec.steps[0], spec.steps[1] + 1, n)
    return Cohort(
        age=age,
        sex=sex,
        weight=weight,
        creatinine_base=creatinine,
        dialysis=dialysis,
        serious=serious,
        eta_cl=eta_cl,
        eta_vc=eta_vc,
        eta_vp=eta_vp,
        severity0=severity0,
        sbp_base=sbp_base,
        hr_base=hr_base,
        interval_h=interval,
        dose_mg=dose,
        loading_mg=loading,
        steps=steps,
    )


def aki_hazard(auc24, trough, kidney: KidneyModel = KidneyModel()) -> np.ndarray:
    """Probability of an AKI starting within one 4 h step, monotone in both exposures."""

    def ramp(x):
        return 1.0 / (1.0 + np.exp(-4.0 * x)) + 0.5 * np.maximum(x, 0.0)

    log_h = (
        np.log(kidney.base_hazard_per_step)
        + np.log(kidney.or_auc_over_600) * ramp((auc24 - 600.0) / 100.0)
        + np.log(kidney.or_trough_over_20) * ramp((trough - 20.0) / 5.0)
    )
    return 1.0 - np.exp(-np.exp(log_h))


def step_reward(auc24, new_aki, weights: RewardWeights = RewardWeights()) -> np.ndarray:
    lo, hi = AUC_TARGET
    in_target = (auc24 >= lo) & (auc24 <= hi)
    return (
        weights.in_target * in_target
        - weights.under * np.maximum(lo - auc24, 0.0) / lo
        - weights.over * np.maximum(auc24 - hi, 0.0) / hi
        - weights.aki * new_aki
    )


@dataclass(frozen=True)
class StepInfo:
    """What happened during one decision step, for every patient ([N] arrays, all hidden truths)."""

    reward: np.ndarray
    auc24: np.ndarray  # rolling AUC over the last 24 h at the end of the step
    concentration: np.ndarray  # true central concentration at the end of the step
    trough: np.ndarray  # last true pre-dose concentration
    creatinine: np.ndarray  # true serum creatinine
    severity: np.ndarray  # infection severity
    new_aki: np.ndarray  # bool: an injury started this step
    dose_mg: np.ndarray  # regimen in force for the next doses


class VancomycinSimulator:
    """All patients of a cohort advance together, one 4 h decision step per ``step`` call.

    Every random draw of the patients (measurement noise, missing values, AKI events) is made up
    front from ``seed``, so two policies run on the same cohort and seed meet identical luck:
    their outcomes differ only through their decisions (common random numbers).

    Every administration is recorded (`administrations`), so a model-informed dosing method can
    replay the exact dosing record through the PK model.
    """

    def __init__(self, cohort: Cohort, seed: int, config: VancomycinConfig = VancomycinConfig()):
        self.cohort, self.config = cohort, config
        n, horizon = cohort.n, int(cohort.steps.max()) + 1
        rng = np.random.default_rng(seed)
        self._noise = rng.standard_normal((horizon, n, len(FEATURES) + 1))  # +1: proportional level error
        self._missing = rng.random((horizon, n, len(FEATURES))) < config.cohort.missing_prob
        self._aki_u = rng.random((horizon, n))
        self._gfr_drop = rng.uniform(*config.kidney.gfr_drop, (horizon, n))
        self.reset()

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> np.ndarray:
        c = self.cohort
        n = c.n
        self.t = 0  # decision steps taken
        self.hour = 0
        self.x = np.zeros((n, 3))  # Ac, Ap (mg), cumulative AUC (mg*h/L)
        self.auc_hourly = np.zeros((n, 24))  # ring buffer of hourly AUC increments
        self.dose = c.dose_mg.astype(float).copy()
        self.infusion_left_h = np.zeros(n)
        self.infusion_rate = np.zeros(n)
        self.trough = np.zeros(n)
        self.gfr = np.ones(n)  # fraction of baseline GFR
        self.creatinine = c.creatinine_base.astype(float).copy()
        self.severity = c.severity0.astype(float).copy()
        self.aki_onset = np.zeros(n, dtype=bool)
        self.last_dose_hour = np.zeros(n, dtype=np.int64)  # start hour of the latest administration
        self._dose_log: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (hour, patients, mg, h)
        self._refresh_pk()
        # The first charted row comes one decision step after the first (loading) dose started,
        # so the first level a policy sees is a real post-dose level, not the empty pre-dose one.
        for _ in range(int(DECISION_HOURS / SUBSTEP_HOURS)):
            self._advance_hour()
        self._refresh_pk()
        return self.observe()

    def _refresh_pk(self) -> None:
        # Drug clearance follows GFR at once; serum creatinine (what is charted) lags behind it.
        cl, vc, vp, q = pk_parameters(self.cohort, self.cohort.creatinine_base / self.gfr, self.config.pk)
        self._phi, self._gamma = transition_matrices(cl, vc, vp, q, SUBSTEP_HOURS)
        self._vc = vc

    @property
    def concentration(self) -> np.ndarray:
        return self.x[:, 0] / self._vc

    @property
    def auc24(self) -> np.ndarray:
        """Rolling AUC over the last 24 h; before 24 h have passed, extrapolated from the hours so far."""
        hours = min(self.hour, 24)
        return self.auc_hourly.sum(axis=1) * (24.0 / max(hours, 1))

    # -- dynamics --------------------------------------------------------------------------
    def set_dose(self, dose_mg: np.ndarray) -> None:
        """Write the regimen directly (mg per administration, clipped to the regimen's limits), bypassing
        the +-max_change step rule: for a policy that sets the maintenance dose freely. Follow it with
        ``step(0)``, which keeps the written dose exactly."""
        reg = self.config.regimen
        dose = np.asarray(dose_mg, dtype=float).reshape(-1)
        if dose.shape != self.dose.shape or not np.isfinite(dose).all():
            raise ValueError(f"set_dose: expected {self.dose.shape[0]} finite doses in mg, got {dose}")
        self.dose = np.clip(dose, reg.min_dose_mg, reg.max_dose_mg)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, StepInfo]:
        """Apply relative dose changes ``action`` in [-1, 1] and advance 4 h."""
        cfg = self.config
        self.dose = cfg.regimen.next_dose(self.dose, np.asarray(action, dtype=float).reshape(-1))
        for _ in range(int(DECISION_HOURS / SUBSTEP_HOURS)):
            self._advance_hour()
        auc24 = self.auc24
        hazard = aki_hazard(auc24, self.trough, cfg.kidney)
        new_aki = (self._aki_u[self.t] < hazard) & ~self.aki_onset & (self.cohort.dialysis == 0)  # one injury per patient
        self.gfr = np.where(new_aki, self.gfr * self._gfr_drop[self.t], self.gfr)
        self.aki_onset |= new_aki
        self._refresh_pk()
        reward = step_reward(auc24, new_aki, cfg.reward)
        self.t += 1
        info = StepInfo(
            reward=reward,
            auc24=auc24,
            concentration=self.concentration,
            trough=self.trough.copy(),
            creatinine=self.creatinine.copy(),
            severity=self.severity.copy(),
            new_aki=new_aki,
            dose_mg=self.dose.copy(),
        )
        return self.observe(), info

    def _advance_hour(self) -> None:
        c, cfg = self.cohort, self.config
        due = (self.hour % c.interval_h) == 0
        if due.any():
            self.trough = np.where(due & (self.hour > 0), self.concentration, self.trough)
            amount = self.dose if self.hour > 0 else c.loading_mg.astype(float)
            hours = np.ceil(amount / cfg.regimen.max_rate_mg_h)
            self.infusion_left_h = np.where(due, hours, self.infusion_left_h)
            self.infusion_rate = np.where(due, amount / hours, self.infusion_rate)
            self.last_dose_hour = np.where(due, self.hour, self.last_dose_hour)
            patients = np.flatnonzero(due)
            self._dose_log.append((self.hour, patients, amount[patients].copy(), hours[patients].copy()))
        u = np.where(self.infusion_left_h > 0, self.infusion_rate, 0.0)
        auc_before = self.x[:, 2].copy()
        self.x = np.einsum("nij,nj->ni", self._phi, self.x) + self._gamma * u[:, None]
        self.infusion_left_h = np.maximum(self.infusion_left_h - SUBSTEP_HOURS, 0.0)
        self.auc_hourly[:, self.hour % 24] = self.x[:, 2] - auc_before
        self.hour += 1
        # Kidney: GFR recovers towards baseline, creatinine follows 1/GFR with a lag (exact 1 h steps).
        kid = cfg.kidney
        self.gfr = 1.0 - (1.0 - self.gfr) * np.exp(-SUBSTEP_HOURS / kid.recovery_h)
        target = c.creatinine_base / self.gfr
        self.creatinine = target + (self.creatinine - target) * np.exp(-SUBSTEP_HOURS / kid.creatinine_lag_h)
        # Infection: logistic growth against an Emax kill on the current AUC24/MIC (Euler, 1 h).
        inf = cfg.infection
        ratio = self.auc24 / inf.mic_mg_l
        effect = ratio**inf.hill / (inf.auc50**inf.hill + ratio**inf.hill)
        ds = inf.growth_per_h * self.severity * (1.0 - self.severity / 1.2) - inf.kill_per_h * effect * self.severity
        self.severity = np.clip(self.severity + SUBSTEP_HOURS * ds, 0.0, 1.2)

    # -- observation -----------------------------------------------------------------------
    def observe(self) -> np.ndarray:
        """The 7 charted features [N, 7], with measurement noise; NaN where not charted."""
        c, pk = self.cohort, self.config.pk
        z = self._noise[self.t]
        s = self.severity
        conc = self.concentration
        level = conc * (1.0 + pk.sigma_prop * z[:, 7]) + pk.sigma_add_mg_l * z[:, 0]
        level = np.maximum(level, pk.lloq_mg_l)
        obs = np.stack(
            [
                level,
                np.maximum(self.creatinine * (1.0 + 0.05 * z[:, 1]), 0.1),
                np.maximum(6.0 + 14.0 * s + 1.0 * z[:, 2], 0.5),
                np.maximum(12.0 * self.creatinine + 6.0 * s + 2.0 * z[:, 3], 2.0),
                36.8 + 1.8 * s + 0.2 * z[:, 4],
                c.sbp_base - 25.0 * s + 8.0 * z[:, 5],
                c.hr_base + 35.0 * s + 6.0 * z[:, 6],
            ],
            axis=1,
        )
        return np.where(self._missing[self.t], np.nan, obs)

    def dose_state(self) -> np.ndarray:
        """The dose-aware values `DOSE_FEATURES` [N, 6], exact and never missing, at the time of `observe`.

        ``dose_mg`` is the regimen in force (the next administrations get it unless the next
        action changes it); ``hours_since_dose`` counts from the start of the latest administration.
        """
        c = self.cohort
        return np.stack(
            [self.dose, c.interval_h, self.hour - self.last_dose_hour, c.weight, c.age, c.dialysis],
            axis=1,
        ).astype(np.float64)

    def administrations(self) -> list[np.ndarray]:
        """Every administration so far, per patient: ``[k, 3]`` rows of (start hour, amount mg, infusion h).

        Start hours count from the first (loading) dose at hour 0, on the simulator's clock: the
        observation of decision step t is made at hour ``DECISION_HOURS * (t + 1)``. Each dose is a
        zero-order infusion of ``amount / duration`` mg/h into the central compartment, so replaying
        these rows through `transition_matrices` with the patient's PK parameters gives its concentration.
        """
        rows: list[list[tuple[float, float, float]]] = [[] for _ in range(self.cohort.n)]
        for hour, patients, amounts, durations in self._dose_log:
            for i, amount, duration in zip(patients, amounts, durations):
                rows[i].append((float(hour), float(amount), float(duration)))
        return [np.asarray(r, dtype=np.float64).reshape(-1, 3) for r in rows]


def kdigo_aki(creatinine: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """KDIGO creatinine criterion: rise >= 0.3 mg/dL or >= 1.5x baseline at any step. creatinine: [T, N]."""
    return ((creatinine >= 1.5 * baseline) | (creatinine >= baseline + 0.3)).any(axis=0)


# Charted values assumed before the first measurement of a feature (normal adult values).
NORMAL_VALUES = np.array([15.0, 1.0, 8.0, 15.0, 37.0, 120.0, 80.0])

# A policy maps observations [N, D] to relative dose changes [N] in [-1, 1]: by default the 7
# LOCF-filled charted features; `rollout(features=...)` picks any columns of OBSERVATION_NAMES.
# Two opt-in attributes change how `rollout` calls it (see `rollout`): ``needs_record = True``
# -> ``policy(obs, record)`` with a `ChartRecord`; ``returns_dose_mg = True`` -> it returns the
# next maintenance dose in mg [N] instead of an action.
Policy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ChartRecord:
    """What the ward knows at one decision, for a policy that replays the dosing record through a PK model.

    Only what a pharmacist can see: the administrations given, the charted values as charted (the
    level of row s was drawn at ``observation_hours[s]``; a reading at the LLOQ means "below it"), the
    regimen in force and the covariates. No hidden truth (PK parameters, AUC, AKI state).
    """

    administrations: tuple[np.ndarray, ...]  # per patient [k, 3] (start hour, mg, infusion h), all started before `hour`
    observation_hours: np.ndarray  # [t + 1] simulator hour of every row so far; the last is the decision's
    charted: np.ndarray  # [t + 1, N, 7] FEATURES as charted (not filled), NaN where not charted
    dose_mg: np.ndarray  # [N] regimen in force before this decision
    interval_h: np.ndarray  # [N] dosing interval, h
    age: np.ndarray  # [N] years
    sex: np.ndarray  # [N] 1 male, 0 female
    weight_kg: np.ndarray  # [N]
    dialysis: np.ndarray  # [N] 1 on dialysis

    @property
    def hour(self) -> int:
        """Simulator hour of the decision (the first dose started at hour 0)."""
        return int(self.observation_hours[-1])

    @property
    def n(self) -> int:
        return int(self.dose_mg.shape[0])


@dataclass(frozen=True)
class Trajectories:
    """One rollout of a cohort. Arrays are [T, N] (T = longest episode); steps past ``cohort.steps`` are padding."""

    observations: np.ndarray  # [T, N, 7] as charted, NaN where missing
    actions: np.ndarray  # relative dose changes applied
    rewards: np.ndarray
    auc24: np.ndarray  # rolling AUC24 at the end of each step
    cumulative_auc: np.ndarray  # AUC since the first dose at the end of each step
    concentration: np.ndarray  # true level at the end of each step
    creatinine: np.ndarray  # true serum creatinine at the end of each step
    new_aki: np.ndarray  # bool
    dose_mg: np.ndarray  # regimen after each decision
    steps: np.ndarray  # [N] episode lengths
    dose_state: np.ndarray | None = None  # [T, N, 6] DOSE_FEATURES at each observation (before its decision)
    # Per patient, (start hour, amount mg, infusion h) of every administration within the course
    # (from the loading dose at hour 0 to the end of its last step); see `VancomycinSimulator.administrations`.
    administrations: tuple[np.ndarray, ...] = ()

    @property
    def mask(self) -> np.ndarray:
        """[T, N] bool, True on real (non-padding) steps."""
        return np.arange(self.actions.shape[0])[:, None] < self.steps[None, :]

    @property
    def observation_hours(self) -> np.ndarray:
        """[T] simulator hour of each step's observation (the first dose starts at hour 0)."""
        return (np.arange(self.actions.shape[0]) + 1) * DECISION_HOURS


def fill_forward(obs: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Last observation carried forward: what a chart shows when a value was not measured."""
    return np.where(np.isnan(obs), last, obs)


def policy_features(policy: Policy) -> tuple[str, ...]:
    """The columns a policy asks for: the ``feature_names`` it (or, for a bound method such as
    ``TrainedIQL.policy_action``, its model) declares; otherwise the 7 charted features."""
    for owner in (policy, getattr(policy, "__self__", None)):
        names = getattr(owner, "feature_names", None)
        if names is not None:
            return tuple(names)
    return FEATURES


def _declares(policy: Policy, flag: str) -> bool:
    """Whether a policy (or, for a bound method, its object) sets the opt-in attribute ``flag`` to True."""
    return any(getattr(owner, flag, False) is True for owner in (policy, getattr(policy, "__self__", None)))


def feature_columns(features: Sequence[str]) -> np.ndarray:
    """Column indices of ``features`` in OBSERVATION_NAMES; an unknown name is a ValueError listing the known ones."""
    unknown = [name for name in features if name not in OBSERVATION_NAMES]
    if unknown:
        raise ValueError(f"the simulator has no feature {', '.join(map(repr, unknown))}; it observes {', '.join(OBSERVATION_NAMES)}")
    return np.array([OBSERVATION_NAMES.index(name) for name in features], dtype=np.int64)


def rollout(
    cohort: Cohort,
    policy: Policy,
    seed: int,
    config: VancomycinConfig = VancomycinConfig(),
    features: Sequence[str] | None = None,
) -> Trajectories:
    """Run ``policy`` on every patient for its episode length. The policy sees the columns ``features``
    (names of OBSERVATION_NAMES, in that order; default `policy_features`): charted ones LOCF-filled,
    dose-aware ones exact.

    A policy that declares ``needs_record = True`` is called ``policy(obs, record)`` with the `ChartRecord`
    of the decision (every administration and charted value so far, the regimen and the covariates).
    One that declares ``returns_dose_mg = True`` returns the next maintenance dose in mg, which the
    simulator writes directly (`VancomycinSimulator.set_dose`, clipped to the regimen's limits) instead
    of moving the dose by at most +-max_change; its ``actions`` are then the implied relative changes
    ``(new / old - 1) / max_change``, which may lie outside [-1, 1]. Other policies are called as before.
    """
    columns = feature_columns(policy_features(policy) if features is None else features)
    wants_record, sets_dose = _declares(policy, "needs_record"), _declares(policy, "returns_dose_mg")
    sim = VancomycinSimulator(cohort, seed, config)
    raw = sim.reset()
    filled = fill_forward(raw, np.broadcast_to(NORMAL_VALUES, raw.shape))
    horizon = int(cohort.steps.max())
    keys = (
        "observations",
        "dose_state",
        "actions",
        "rewards",
        "auc24",
        "cumulative_auc",
        "concentration",
        "creatinine",
        "new_aki",
        "dose_mg",
    )
    out: dict[str, list] = {k: [] for k in keys}
    for _ in range(horizon):
        dose_state = sim.dose_state()
        seen = np.concatenate([filled, dose_state], axis=1)[:, columns]
        decision = policy(seen, _chart_record(sim, out["observations"] + [raw])) if wants_record else policy(seen)
        if sets_dose:
            before = sim.dose.copy()
            sim.set_dose(decision)
            action = (sim.dose / before - 1.0) / config.regimen.max_change
            step_action = np.zeros(cohort.n)  # keeps the dose just written
        else:
            action = step_action = np.clip(np.asarray(decision, dtype=float).reshape(-1), -1.0, 1.0)
        out["observations"].append(raw)
        out["dose_state"].append(dose_state)
        out["actions"].append(action)
        raw, info = sim.step(step_action)
        filled = fill_forward(raw, filled)
        out["rewards"].append(info.reward)
        out["auc24"].append(info.auc24)
        out["cumulative_auc"].append(sim.x[:, 2].copy())
        out["concentration"].append(info.concentration)
        out["creatinine"].append(info.creatinine)
        out["new_aki"].append(info.new_aki)
        out["dose_mg"].append(info.dose_mg)
    course_end = DECISION_HOURS * (cohort.steps + 1)  # end of each patient's last step
    administrations = tuple(record[record[:, 0] < end] for record, end in zip(sim.administrations(), course_end))
    return Trajectories(**{k: np.stack(v) for k, v in out.items()}, steps=cohort.steps.copy(), administrations=administrations)


def _chart_record(sim: VancomycinSimulator, charted: list[np.ndarray]) -> ChartRecord:
    """The `ChartRecord` at the simulator's current decision; ``charted`` holds the raw rows so far."""
    c = sim.cohort
    return ChartRecord(
        administrations=tuple(sim.administrations()),
        observation_hours=(np.arange(len(charted)) + 1.0) * DECISION_HOURS,
        charted=np.stack(charted),
        dose_mg=sim.dose.copy(),
        interval_h=c.interval_h.astype(np.float64),
        age=c.age.copy(),
        sex=c.sex.copy(),
        weight_kg=c.weight.copy(),
        dialysis=c.dialysis.copy(),
    )
