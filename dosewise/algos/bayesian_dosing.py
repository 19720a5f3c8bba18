"""Model-informed vancomycin dosing: MAP-Bayesian PK from a patient's levels, then the dose for AUC24 500.

The standard of care a learned policy has to beat (2020 ASHP/IDSA/PIDS/SIDP consensus): start from the
population model for the patient's covariates, update the patient's clearance and volumes from the measured
levels (maximum a posteriori), and give the maintenance dose whose steady-state AUC24 is the middle of the
400-600 mg*h/L target.

Plain arrays in, numbers out, so the same code doses simulated patients and real charts. All patients are
estimated together: each has its own damped Newton iteration on the 3 random effects, and rows never
influence each other. Concentrations come from the closed-form two-compartment solution for zero-order
infusions (superposition of doses), which equals the simulator's hour-by-hour matrix-exponential
propagation exactly and is differentiable.

The objective is -2 log posterior:
``sum_quantified [(y - c)^2 / V(c) + log V(c)] - 2 sum_censored log Phi((LLOQ - c) / sqrt V(c)) + sum_k eta_k^2 / omega_k^2``
with ``V(c) = sigma_add^2 + (sigma_prop * c)^2``. A level reported at or below the LLOQ only says that the
measurement was below it, so it enters through the probability of that (censored likelihood, "M3").

Units: mg, L, L/h, mg/L, h, mg*h/L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dosewise.sim.vancomycin import GotiPK, cockcroft_gault

GRADIENT_TOL = 1e-7  # |d objective / d eta|_inf at which a patient's iteration stops
MAX_STEP = 1.0  # largest change of any eta in one Newton step (a factor e on a parameter)
# Newton starting points, in between-patient SDs of (log CL, log Vc, log Vp); the first is the population prediction.
START_POINTS = np.array([[0.0, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, -1.5, 0.0], [1.5, 0.0, 0.0], [-1.5, 0.0, 0.0]])


@dataclass(frozen=True)
class DosingRecord:
    """One patient's administrations, measured levels and covariates. Times are hours from any fixed origin."""

    dose_start_h: np.ndarray  # [D] start of each infusion
    dose_mg: np.ndarray  # [D] amount of each infusion
    infusion_h: np.ndarray  # [D] duration of each infusion (> 0), given at a constant rate
    sample_h: np.ndarray  # [S] time of each level
    level_mg_l: np.ndarray  # [S] as reported; at or below the LLOQ means "below the LLOQ"; NaN means not measured
    age: float  # years
    weight_kg: float  # total body weight
    creatinine: float  # latest serum creatinine, mg/dL
    male: bool
    dialysis: bool
    # Admission creatinine, if known: patients over 60 get the 1 mg/dL floor on it and the current rise scales
    # it (as the population model's clearance does), instead of a floor on the current value.
    creatinine_baseline: float | None = None

    def __post_init__(self) -> None:
        for name in ("dose_start_h", "dose_mg", "infusion_h", "sample_h", "level_mg_l"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.ndim == 0:
                value = value.reshape(1)
            if value.ndim != 1:
                raise ValueError(f"DosingRecord.{name}: expected a 1-D array, got shape {value.shape}")
            object.__setattr__(self, name, value)
        if not (self.dose_start_h.shape == self.dose_mg.shape == self.infusion_h.shape):
            raise ValueError(
                "DosingRecord: dose_start_h, dose_mg and infusion_h must have the same length, got "
                f"{self.dose_start_h.size}, {self.dose_mg.size} and {self.infusion_h.size}"
            )
        if self.sample_h.shape != self.level_mg_l.shape:
            raise ValueError(
                f"DosingRecord: sample_h and level_mg_l must have the same length, got {self.sample_h.size} and {self.level_mg_l.size}"
            )
        for name in ("dose_start_h", "dose_mg", "infusion_h", "sample_h"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"DosingRecord.{name}: expected finite values, got {getattr(self, name)}")
        if (self.dose_mg < 0).any():
            raise ValueError(f"DosingRecord.dose_mg: expected amounts >= 0 mg, got {self.dose_mg}")
        if (self.infusion_h <= 0).any():
            raise ValueError(f"DosingRecord.infusion_h: expected durations > 0 h, got {self.infusion_h}")
        for name, low, high in (("age", 18.0, 120.0), ("weight_kg", 20.0, 400.0), ("creatinine", 0.05, 30.0)):
            value = float(getattr(self, name))
            if not low <= value <= high:
                raise ValueError(f"DosingRecord.{name}: expected a value in [{low}, {high}], got {value}")
            object.__setattr__(self, name, value)
        if self.creatinine_baseline is not None:
            value = float(self.creatinine_baseline)
            if not 0.05 <= value <= 30.0:
                raise ValueError(f"DosingRecord.creatinine_baseline: expected a value in [0.05, 30] mg/dL, got {value}")
            object.__setattr__(self, "creatinine_baseline", value)
        object.__setattr__(self, "male", bool(self.male))
        object.__setattr__(self, "dialysis", bool(self.dialysis))


@dataclass(frozen=True)
class PKEstimate:
    """Individual PK parameters of N patients (MAP estimates, or the population prediction when eta = 0)."""

    cl_l_h: np.ndarray  # [N] clearance
    vc_l: np.ndarray  # [N] central volume
    vp_l: np.ndarray  # [N] peripheral volume
    q_l_h: np.ndarray  # [N] inter-compartmental clearance
    eta: np.ndarray  # [N, 3] log deviations of (CL, Vc, Vp) from the population prediction
    eta_covariance: np.ndarray  # [N, 3, 3] Laplace approximation of the posterior covariance of eta
    levels_used: np.ndarray  # [N] levels that entered the fit (censored ones included)
    converged: np.ndarray  # [N] bool: gradient below GRADIENT_TOL at a minimum


@dataclass(frozen=True)
class RegimenPrediction:
    """What a maintenance regimen would give each patient ([N] arrays)."""

    auc24: np.ndarray  # mean daily AUC over the window after its first dose (the AUC itself for a 24 h window)
    trough: np.ndarray  # concentration just before the first regimen dose at or after the end of the window
    auc24_steady_state: np.ndarray  # 24 * dose / (interval * CL): where the regimen settles


def omegas(pk: GotiPK = GotiPK()) -> np.ndarray:
    """Between-patient SDs of log CL, log Vc, log Vp [3], from the model's CVs."""
    return np.sqrt(np.log1p(np.array([pk.cv_cl, pk.cv_vc, pk.cv_vp]) ** 2))


def population_parameters(records: Sequence[DosingRecord], pk: GotiPK = GotiPK()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Typical CL, Vc, Vp, Q [N] for each record's covariates (the prior means)."""
    age = np.array([r.age for r in records], dtype=np.float64)
    weight = np.array([r.weight_kg for r in records], dtype=np.float64)
    creatinine = np.array([r.creatinine for r in records], dtype=np.float64)
    baseline = np.array([r.creatinine if r.creatinine_baseline is None else r.creatinine_baseline for r in records], dtype=np.float64)
    sex = np.array([1 if r.male else 0 for r in records])
    dialysis = np.array([1.0 if r.dialysis else 0.0 for r in records])
    crcl = cockcroft_gault(age, weight, creatinine, sex, pk, baseline=baseline)
    cl = pk.cl_l_h * (crcl / pk.cl_crcl_ref) ** pk.cl_crcl_exp * pk.cl_dialysis_factor**dialysis
    vc = pk.vc_l * (weight / 70.0) * pk.vc_dialysis_factor**dialysis
    vp = pk.vp_l * (weight / 70.0)
    return cl, vc, vp, np.full_like(cl, pk.q_l_h)


def population_estimate(records: Sequence[DosingRecord], pk: GotiPK = GotiPK()) -> PKEstimate:
    """The prior as an estimate: what dosing from covariates alone assumes."""
    cl, vc, vp, q = population_parameters(records, pk)
    n = cl.shape[0]
    return PKEstimate(
        cl_l_h=cl,
        vc_l=vc,
        vp_l=vp,
        q_l_h=q,
        eta=np.zeros((n, 3)),
        eta_covariance=np.broadcast_to(np.diag(omegas(pk) ** 2), (n, 3, 3)).copy(),
        levels_used=np.zeros(n, dtype=np.int64),
        converged=np.ones(n, dtype=bool),
    )


# -- closed-form two-compartment exposure ------------------------------------------------------


def _disposition(cl: torch.Tensor, vc: torch.Tensor, vp: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponents lambda [N, 2] and coefficients [N, 2] (1/L) of the central concentration after a unit bolus.

    The discriminant is written as a sum of squares and beta as k10*k21/alpha, so neither cancels when CL is small.
    """
    k10, k12, k21 = cl / vc, q / vc, q / vp
    disc = torch.sqrt((k10 + k12 - k21) ** 2 + 4.0 * k12 * k21)  # alpha - beta
    alpha = 0.5 * (k10 + k12 + k21 + disc)
    beta = k10 * k21 / alpha
    lam = torch.stack([alpha, beta], dim=-1)
    coef = torch.stack([(alpha - k21) / (vc * disc), (k21 - beta) / (vc * disc)], dim=-1)
    return lam, coef


def _exposure(
    times: torch.Tensor, start: torch.Tensor, rate: torch.Tensor, duration: torch.Tensor, lam: torch.Tensor, coef: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Central concentration and AUC since the first dose at ``times`` [N, T], by superposition of infusions [N, D].

    An infusion of rate R from s for T hours adds ``R * sum_i coef_i / lam_i * w_i`` to the concentration with
    ``w_i = exp(-lam_i (t-s-T)+) * (1 - exp(-lam_i clip(t-s, 0, T)))``, and ``R * sum_i coef_i / lam_i * (clip - w_i / lam_i)``
    to the AUC. Padded doses carry rate 0.
    """
    tau = times[:, :, None] - start[:, None, :]  # [N, T, D]
    infused_h = torch.minimum(tau.clamp_min(0.0), duration[:, None, :])[..., None]  # [N, T, D, 1]
    after_h = (tau - duration[:, None, :]).clamp_min(0.0)[..., None]
    lam4 = lam[:, None, None, :]  # [N, 1, 1, 2]
    w = torch.exp(-lam4 * after_h) * -torch.expm1(-lam4 * infused_h)  # [N, T, D, 2]
    scale = rate[:, None, :, None] * (coef / lam)[:, None, None, :]
    conc = (scale * w).sum(dim=(-1, -2))
    auc = (scale * (infused_h - w / lam4)).sum(dim=(-1, -2))
    return conc, auc


def _pad(arrays: Sequence[np.ndarray], fill: float) -> torch.Tensor:
    width = max([a.shape[0] for a in arrays] + [1])
    out = np.full((len(arrays), width), fill, dtype=np.float64)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return torch.from_numpy(out)


def _doses(records: Sequence[DosingRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded starts, rates (mg/h) and durations [N, D]; padding is a zero-rate infusion."""
    start = _pad([r.dose_start_h for r in records], 0.0)
    rate = _pad([r.dose_mg / r.infusion_h for r in records], 0.0)
    duration = _pad([r.infusion_h for r in records], 1.0)
    return start, rate, duration


def _parameters(estimate: PKEstimate, n: int) -> tuple[torch.Tensor, ...]:
    if estimate.cl_l_h.shape[0] != n:
        raise ValueError(f"PKEstimate has {estimate.cl_l_h.shape[0]} patients but {n} records were given")
    return tuple(torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (estimate.cl_l_h, estimate.vc_l, estimate.vp_l, estimate.q_l_h))


# -- MAP estimation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Posterior:
    """Everything the objective of N patients needs, padded to common widths; padding carries zero weight."""

    log_pop: torch.Tensor  # [N, 3] log of the population CL, Vc, Vp
    q: torch.Tensor  # [N]
    start: torch.Tensor  # [N, D] infusion starts
    rate: torch.Tensor  # [N, D] mg/h, 0 on padding
    duration: torch.Tensor  # [N, D]
    times: torch.Tensor  # [N, S] sample times
    levels: torch.Tensor  # [N, S] reported levels
    quantified: torch.Tensor  # [N, S] 1 where the level is above the LLOQ
    censored: torch.Tensor  # [N, S] 1 where the level is reported at or below the LLOQ

    def select(self, rows: torch.Tensor) -> _Posterior:
        """Patients ``rows`` (repeats allowed: one copy per Newton starting point)."""
        return _Posterior(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def neg2_log_posterior(self, eta: torch.Tensor, pk: GotiPK) -> torch.Tensor:
        """-2 log posterior of each patient [N], up to a constant."""
        params = torch.exp(self.log_pop + eta)
        lam, coef = _disposition(params[:, 0], params[:, 1], params[:, 2], self.q)
        conc, _ = _exposure(self.times, self.start, self.rate, self.duration, lam, coef)
        var = pk.sigma_add_mg_l**2 + (pk.sigma_prop * conc) ** 2
        fit = self.quantified * ((self.levels - conc) ** 2 / var + torch.log(var))
        below = self.censored * -2.0 * torch.special.log_ndtr((pk.lloq_mg_l - conc) / torch.sqrt(var))
        inv_omega2 = torch.from_numpy(1.0 / omegas(pk) ** 2)
        return (fit + below).sum(dim=1) + (eta**2 * inv_omega2).sum(dim=1)


def _value_gradient_hessian(posterior: _Posterior, eta: torch.Tensor, pk: GotiPK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective [N], gradient [N, 3] and Hessian [N, 3, 3]. Patients are separable, so autograd of the
    batch sum gives every patient's own gradient and Hessian rows."""
    eta = eta.detach().requires_grad_(True)
    value = posterior.neg2_log_posterior(eta, pk)
    (grad,) = torch.autograd.grad(value.sum(), eta, create_graph=True)
    rows = [torch.autograd.grad(grad[:, k].sum(), eta, retain_graph=k < 2)[0] for k in range(3)]
    return value.detach(), grad.detach(), torch.stack(rows, dim=1).detach()


def _newton(posterior: _Posterior, eta: torch.Tensor, pk: GotiPK, iterations: int) -> tuple[torch.Tensor, ...]:
    """Levenberg-damped Newton from ``eta`` [N, 3], every patient on its own: the step divides by the Hessian's
    absolute eigenvalues plus a damping that shrinks after a step that lowers the objective and grows after
    one that does not. Returns eta, objective, gradient, Hessian at the end."""
    eta = eta.clone()
    value, grad, hess = _value_gradient_hessian(posterior, eta, pk)
    damping = torch.full((eta.shape[0],), 1e-3, dtype=torch.float64)
    active = torch.nonzero(grad.abs().amax(dim=1) >= GRADIENT_TOL)[:, 0]
    for _ in range(iterations):
        if len(active) == 0:
            break
        # Only patients still iterating are evaluated: most converge in a few steps, a few need many.
        g, h, lam = grad[active], hess[active], damping[active]
        evals, evecs = torch.linalg.eigh(h)
        curvature = evals.abs().clamp_min(1e-8) + lam[:, None]
        step = (-evecs @ ((evecs.transpose(1, 2) @ g[:, :, None]) / curvature[:, :, None]))[:, :, 0]
        step = step * torch.clamp(MAX_STEP / step.abs().amax(dim=1).clamp_min(1e-300), max=1.0)[:, None]
        new_value, new_grad, new_hess = _value_gradient_hessian(posterior.select(active), eta[active] + step, pk)
        better = torch.isfinite(new_value) & (new_value <= value[active])
        take = active[better]
        eta[take] = eta[active][better] + step[better]
        value[take], grad[take], hess[take] = new_value[better], new_grad[better], new_hess[better]
        damping[active] = torch.where(better, (lam / 3.0).clamp_min(1e-9), lam * 5.0)
        stuck = damping[active] > 1e12  # no step of any length lowers the objective: at a minimum to rounding
        active = active[~stuck & (grad[active].abs().amax(dim=1) >= GRADIENT_TOL)]
    return eta, value, grad, hess


def map_estimate(
    records: Sequence[DosingRecord], pk: GotiPK = GotiPK(), iterations: int = 40, initial_eta: np.ndarray | None = None
) -> PKEstimate:
    """MAP estimates of every patient's CL, Vc, Vp from their levels, all patients at once.

    A few levels can fit two ways (e.g. a small Vc with a high CL, or a large Vc with the typical CL), so the
    posterior may have more than one mode: Newton runs from each of START_POINTS (in units of the
    between-patient SDs) and each patient keeps its lowest minimum; ``iterations`` caps the Newton steps per
    start (a fit typically needs 5-15). Without levels the estimate is the prior. Levels that are NaN count as
    not measured. Deterministic; a patient's result does not depend on the other patients in the batch.

    ``initial_eta`` [N, 3] is a warm start (e.g. each patient's fit from a few levels earlier): Newton then
    runs once per patient from it instead of from every start point, about five times less work, at the
    price of staying in that mode. Patients without levels still get the prior.
    """
    if len(records) == 0:
        raise ValueError("map_estimate: expected at least one DosingRecord")
    if iterations < 0:
        raise ValueError(f"map_estimate: iterations must be >= 0, got {iterations}")
    n = len(records)
    if initial_eta is not None:
        initial_eta = np.asarray(initial_eta, dtype=np.float64)
        if initial_eta.shape != (n, 3) or not np.isfinite(initial_eta).all():
            raise ValueError(f"map_estimate: initial_eta must be finite with shape ({n}, 3), got shape {initial_eta.shape}")
    prior = population_estimate(records, pk)
    measured = [np.isfinite(r.level_mg_l) for r in records]
    levels = _pad([r.level_mg_l[m] for r, m in zip(records, measured)], 0.0)
    present = _pad([np.ones(int(m.sum())) for m in measured], 0.0)
    censored = present * (levels <= pk.lloq_mg_l)
    posterior = _Posterior(
        torch.from_numpy(np.log(np.stack([prior.cl_l_h, prior.vc_l, prior.vp_l], axis=1))),
        torch.from_numpy(prior.q_l_h),
        *_doses(records),
        times=_pad([r.sample_h[m] for r, m in zip(records, measured)], 0.0),
        levels=levels,
        quantified=present - censored,
        censored=censored,
    )
    # Patients without levels stay at eta = 0 from the first start; only the others need the other starts.
    fitted = torch.nonzero(present.sum(dim=1) > 0)[:, 0]
    starts = torch.from_numpy(START_POINTS * omegas(pk))
    if initial_eta is not None:
        starts = starts[:1]
    rows = torch.cat([torch.arange(n)] + [fitted] * (len(starts) - 1))
    eta0 = torch.cat([torch.zeros((n, 3), dtype=torch.float64)] + [start.expand(len(fitted), 3) for start in starts[1:]])
    if initial_eta is not None:
        eta0[fitted] = torch.from_numpy(initial_eta)[fitted]
    eta_all, value_all, grad_all, hess_all = _newton(posterior.select(rows), eta0, pk, iterations)
    # Each patient keeps its lowest minimum; a later start must beat the earlier ones by more than rounding.
    index = torch.zeros((len(starts), n), dtype=torch.long)
    values = torch.full((len(starts), n), torch.inf, dtype=torch.float64)
    index[0], values[0] = torch.arange(n), value_all[:n]
    for k in range(1, len(starts)):
        index[k, fitted] = n + (k - 1) * len(fitted) + torch.arange(len(fitted))
        values[k, fitted] = value_all[index[k, fitted]] + 1e-9 * k
    best = index.gather(0, values.argmin(dim=0, keepdim=True))[0]
    eta, grad, hess = eta_all[best], grad_all[best], hess_all[best]
    evals, evecs = torch.linalg.eigh(hess)
    converged = (grad.abs().amax(dim=1) < GRADIENT_TOL * 10) & (evals[:, 0] > 0)
    # -2 log posterior has Hessian 2 * precision; eigenvalues are floored so a flat direction gives a wide, finite variance.
    covariance = evecs @ torch.diag_embed(2.0 / evals.clamp_min(1e-8)) @ evecs.transpose(1, 2)
    params = torch.exp(posterior.log_pop + eta).numpy()
    return PKEstimate(
        cl_l_h=params[:, 0],
        vc_l=params[:, 1],
        vp_l=params[:, 2],
        q_l_h=prior.q_l_h,
        eta=eta.numpy(),
        eta_covariance=covariance.numpy(),
        levels_used=present.sum(dim=1).numpy().astype(np.int64),
        converged=converged.numpy(),
    )


# -- predictions and doses ---------------------------------------------------------------------


def infusion_hours(dose_mg: np.ndarray, max_rate_mg_h: float = 1000.0) -> np.ndarray:
    """Infusion length as the ward runs it: whole hours, no faster than ``max_rate_mg_h`` (at least 1 h)."""
    return np.maximum(np.ceil(np.asarray(dose_mg, dtype=np.float64) / max_rate_mg_h), 1.0)


def concentration_at(estimate: PKEstimate, records: Sequence[DosingRecord], times_h: np.ndarray) -> np.ndarray:
    """Central concentrations [N, T] at ``times_h`` [N, T] (or [T] for all) from the recorded doses."""
    cl, vc, vp, q = _parameters(estimate, len(records))
    times = torch.as_tensor(np.broadcast_to(np.asarray(times_h, dtype=np.float64), (len(records), np.shape(times_h)[-1])).copy())
    with torch.no_grad():
        lam, coef = _disposition(cl, vc, vp, q)
        conc, _ = _exposure(times, *_doses(records), lam, coef)
    return conc.numpy()


def predict(
    estimate: PKEstimate,
    records: Sequence[DosingRecord],
    regimen_dose_mg: np.ndarray,
    interval_h: np.ndarray,
    first_dose_h: np.ndarray,
    hours: float = 24.0,
    max_rate_mg_h: float = 1000.0,
) -> RegimenPrediction:
    """Continue each record with ``regimen_dose_mg`` every ``interval_h`` from ``first_dose_h`` (all [N]).

    The window is ``[first_dose_h, first_dose_h + hours]``; drug still on board from the recorded doses counts.
    Regimen infusions last ``infusion_hours(dose, max_rate_mg_h)``. Recorded doses must start before the regimen.
    """
    n = len(records)
    cl, vc, vp, q = _parameters(estimate, n)
    dose = np.broadcast_to(np.asarray(regimen_dose_mg, dtype=np.float64), (n,))
    interval = np.broadcast_to(np.asarray(interval_h, dtype=np.float64), (n,))
    first = np.broadcast_to(np.asarray(first_dose_h, dtype=np.float64), (n,))
    if hours <= 0:
        raise ValueError(f"predict: hours must be > 0, got {hours}")
    if not (np.isfinite(dose).all() and (dose >= 0).all()):
        raise ValueError(f"predict: regimen_dose_mg must be finite and >= 0 mg, got {dose}")
    if not (np.isfinite(interval).all() and (interval > 0).all()):
        raise ValueError(f"predict: interval_h must be finite and > 0 h, got {interval}")
    for i, r in enumerate(records):
        if r.dose_start_h.size and r.dose_start_h.max() >= first[i]:
            raise ValueError(f"predict: record {i} has a dose at {r.dose_start_h.max()} h, not before first_dose_h {first[i]} h")
    count = np.ceil(hours / interval - 1e-9).astype(np.int64)  # regimen doses that start inside the window
    trough_h = first + count * interval
    new_starts = [first[i] + interval[i] * np.arange(count[i]) for i in range(n)]
    duration = infusion_hours(dose, max_rate_mg_h)
    extended = [
        DosingRecord(
            dose_start_h=np.concatenate([r.dose_start_h, new_starts[i]]),
            dose_mg=np.concatenate([r.dose_mg, np.full(count[i], dose[i])]),
            infusion_h=np.concatenate([r.infusion_h, np.full(count[i], duration[i])]),
            sample_h=np.zeros(0),
            level_mg_l=np.zeros(0),
            age=r.age,
            weight_kg=r.weight_kg,
            creatinine=r.creatinine,
            male=r.male,
            dialysis=r.dialysis,
            creatinine_baseline=r.creatinine_baseline,
        )
        for i, r in enumerate(records)
    ]
    times = torch.from_numpy(np.stack([first, first + hours, trough_h], axis=1))
    with torch.no_grad():
        lam, coef = _disposition(cl, vc, vp, q)
        conc, auc = _exposure(times, *_doses(extended), lam, coef)
    return RegimenPrediction(
        auc24=(auc[:, 1] - auc[:, 0]).numpy() * (24.0 / hours),
        trough=conc[:, 2].numpy(),
        auc24_steady_state=24.0 * dose / (interval * np.asarray(estimate.cl_l_h, dtype=np.float64)),
    )


def dose_for_target_auc(
    estimate: PKEstimate,
    interval_h: np.ndarray,
    target_auc24: float = 500.0,
    min_dose: float = 125.0,
    max_dose: float = 4000.0,
    round_to: float | None = None,
) -> np.ndarray:
    """Maintenance dose per administration [N] whose steady-state AUC24 is ``target_auc24``: target * CL * interval / 24.

    Rounded to a multiple of ``round_to`` (e.g. 250 mg vials) when given, then clipped to [min_dose, max_dose].
    """
    if target_auc24 <= 0:
        raise ValueError(f"dose_for_target_auc: target_auc24 must be > 0, got {target_auc24}")
    if not 0 < min_dose <= max_dose:
        raise ValueError(f"dose_for_target_auc: expected 0 < min_dose <= max_dose, got {min_dose} and {max_dose}")
    interval = np.asarray(interval_h, dtype=np.float64)
    if not (np.isfinite(interval).all() and (interval > 0).all()):
        raise ValueError(f"dose_for_target_auc: interval_h must be finite and > 0 h, got {interval}")
    dose = target_auc24 * np.asarray(estimate.cl_l_h, dtype=np.float64) * interval / 24.0
    if round_to is not None:
        if round_to <= 0:
            raise ValueError(f"dose_for_target_auc: round_to must be > 0 mg, got {round_to}")
        dose = np.round(dose / round_to) * round_to
    return np.clip(dose, min_dose, max_dose)


def action_for_dose(current_dose: np.ndarray, target_dose: np.ndarray, max_change: float = 0.5) -> np.ndarray:
    """The policy action in [-1, 1] that moves the regimen ``dose * (1 + max_change * a)`` towards ``target_dose``.

    Exact when the change is within +-max_change; otherwise the largest allowed step in the right direction.
    """
    current = np.asarray(current_dose, dtype=np.float64)
    if not (np.isfinite(current).all() and (current > 0).all()):
        raise ValueError(f"action_for_dose: current_dose must be finite and > 0 mg, got {current}")
    if max_change <= 0 or not math.isfinite(max_change):
        raise ValueError(f"action_for_dose: max_change must be > 0, got {max_change}")
    return np.clip((np.asarray(target_dose, dtype=np.float64) / current - 1.0) / max_change, -1.0, 1.0)
