"""Closed-loop evaluation of anesthesia policies on held-out simulated cases.

Every policy treats the same cohort with the same patient variability and monitor noise
(common random numbers), so differences come from the decisions. Outcomes are read from the
noise-free BIS and MAP every second - the truth a monitor only estimates - with the induction
metrics of Ionescu et al. 2008 (IEEE TBME 55:2161) as PAS computes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dosewise.checkpoint import write_json_atomic
from dosewise.evaluate.stats import bootstrap_ci, bootstrap_indices
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.model import PlannerModel
from dosewise.planner.policy import PlannerPolicy, planning_modes
from dosewise.sim.anesthesia.cases import (
    PROPOFOL_MG_PER_ML,
    REMIFENTANIL_UG_PER_ML,
    CaseCohort,
    CasePolicy,
    CaseSpec,
    CaseTrajectories,
    run_cases,
    sample_cases,
)
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist

if TYPE_CHECKING:
    from dosewise.planner.training import PlannerRun

INDUCTION_S = 600  # the first 10 minutes are induction; maintenance metrics start after them
N_BOOTSTRAP = 2000
BIS_TARGET = 50.0  # the performance errors' reference, the middle of the 40-60 band


def case_metrics(traj: CaseTrajectories, cohort: CaseCohort) -> dict[str, np.ndarray]:
    """Per-case outcomes, each [N]."""
    seconds = np.arange(traj.bis_true.shape[0])[:, None]
    real = traj.second_mask
    maintenance = real & (seconds >= INDUCTION_S)
    bis, mean_ap = traj.bis_true, traj.map_true
    in_band = (bis >= 40) & (bis <= 60)
    below_60 = (bis < 60) & real
    time_to_60 = np.where(below_60.any(axis=0), below_60.argmax(axis=0), np.nan)
    nadir = np.where(real & (seconds < INDUCTION_S), bis, np.inf).min(axis=0)
    hours = traj.steps * traj.step_s / 3600.0
    rates = np.where(traj.mask[..., None], traj.rates, 0).sum(axis=0) * traj.step_s / 3600.0  # mL given [N, 2]
    weight = cohort.covariates.weight
    errors = performance_errors(bis, maintenance)
    return {
        "pct_bis_40_60": 100.0 * (in_band & maintenance).sum(axis=0) / maintenance.sum(axis=0),
        "pct_map_below_65": 100.0 * ((mean_ap < 65) & real).sum(axis=0) / real.sum(axis=0),
        "map_median_maintenance": np.nanmedian(np.where(maintenance, mean_ap, np.nan), axis=0),
        "time_to_bis_60_s": time_to_60,
        "bis_nadir": nadir,
        "undershoot": np.maximum(40.0 - nadir, 0.0),
        "propofol_mg_kg_h": rates[:, 0] * PROPOFOL_MG_PER_ML / weight / hours,
        "remifentanil_ug_kg_min": rates[:, 1] * REMIFENTANIL_UG_PER_ML / weight / (hours * 60.0),
        **errors,
    }


def performance_errors(bis: np.ndarray, mask: np.ndarray, target: float = BIS_TARGET) -> dict[str, np.ndarray]:
    """Varvel et al. 1992 (J Clin Monit 8:63) per case, against a BIS target: PE = 100 (BIS - target)
    / target at every masked second; MDPE = median PE (bias), MDAPE = median |PE| (inaccuracy),
    wobble = median |PE - MDPE| (variability). bis and mask [T, N] -> each [N] (NaN without data)."""
    pe = np.where(mask, 100.0 * (bis - target) / target, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case without maintenance seconds: NaN
        mdpe = np.nanmedian(pe, axis=0)
        return {"mdpe": mdpe, "mdape": np.nanmedian(np.abs(pe), axis=0), "wobble": np.nanmedian(np.abs(pe - mdpe), axis=0)}


def summarize(metrics: dict[str, np.ndarray], seed: int) -> dict[str, dict]:
    """Mean over cases with a 95 % bootstrap interval (cases resampled); NaN cases ignored."""
    n = next(iter(metrics.values())).shape[0]
    indices = bootstrap_indices(n, N_BOOTSTRAP, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric no case reached (never below BIS 60): NaN
        return {
            name: bootstrap_ci(lambda idx, v=values: np.nanmean(v[idx], axis=-1), indices, float(np.nanmean(values)))
            for name, values in metrics.items()
        }


def evaluate_policies(
    policies: dict[str, Callable[[CaseCohort], CasePolicy]],
    n_cases: int = 100,
    seed: int = 2000,
    spec: CaseSpec = CaseSpec(),
) -> dict:
    """Run each policy (built per cohort by its factory) on the same ``n_cases`` held-out cases."""
    seeds = np.random.SeedSequence(seed).spawn(2)
    cohort = sample_cases(n_cases, np.random.default_rng(seeds[0]), spec)
    sim_seed = int(seeds[1].generate_state(1)[0])
    results = {}
    for name, factory in policies.items():
        traj = run_cases(cohort, factory(cohort), sim_seed, spec)
        results[name] = summarize(case_metrics(traj, cohort), seed)
    return {"cases": n_cases, "seed": seed, "policies": results}


def closed_loop_comparison(
    model: PlannerModel,
    n_cases: int,
    seed: int,
    spec: CaseSpec | None = None,
    modes: dict[str, Callable[[PlannerModel], PlannerPolicy]] | None = None,
    induction_s: float = 600.0,
) -> dict:
    """The planner and the simulated anesthesiologist (the behaviour policy) on the same `n_cases`
    held-out simulated cases (`evaluate_policies`, common random numbers). `modes` maps a name
    to a policy factory; default: {"planner_argmax": argmax}."""
    spec = spec or CaseSpec()
    modes = modes or {"planner_argmax": lambda m: PlannerPolicy(m, induction_s=induction_s, step_s=spec.step_s)}

    def clinician(cohort: CaseCohort) -> SimulatedAnesthesiologist:
        return SimulatedAnesthesiologist(cohort, seed + 1, step_s=spec.step_s)

    policies = {name: (lambda cohort, make=make: make(model)) for name, make in modes.items()}
    return evaluate_policies({**policies, "simulated_anesthesiologist": clinician}, n_cases=n_cases, seed=seed, spec=spec)


def planner_vs_baselines(
    model: PlannerModel,
    run: PlannerRunConfig,
    n_cases: int,
    seed: int,
    spec: CaseSpec | None = None,
    modes: tuple[str, ...] | None = None,
) -> dict:
    """The simulated anesthesiologist ("clinician", its own draws seeded seed + 1), the dual-loop
    PID ("pid") and the planner in `modes` (default the run's closed_loop.modes, as `planning_modes`
    builds them: "planner_<mode>") on the same `n_cases` held-out cases (`evaluate_policies`)."""
    from dosewise.sim.anesthesia.pid import DualLoopPID

    spec = spec or CaseSpec()
    if modes is not None:
        run = run.model_copy(update={"closed_loop": run.closed_loop.model_copy(update={"modes": tuple(modes)})})
    policies = {
        "clinician": lambda cohort: SimulatedAnesthesiologist(cohort, seed + 1, step_s=spec.step_s),
        "pid": lambda cohort: DualLoopPID(cohort),
        **{name: (lambda cohort, make=make: make(model)) for name, make in planning_modes(run).items()},
    }
    return evaluate_policies(policies, n_cases=n_cases, seed=seed, spec=spec)


def evaluate_planner_run(result: PlannerRun, run: PlannerRunConfig, out: str | Path, echo: Callable[[str], Any] = print) -> dict:
    """The trained planner in the modes of `run.closed_loop` next to the simulated anesthesiologist
    on `run.closed_loop.cases` held-out simulated cases, added to the run's summary (and its
    summary.json in `out`) as "closed_loop"; nothing with `cases: 0`."""
    loop = run.closed_loop
    if not loop.cases:
        return result.summary
    echo(f"closed loop: planner ({', '.join(loop.modes)}) and simulated anesthesiologist on {loop.cases} held-out cases")
    result.summary["closed_loop"] = closed_loop_comparison(
        result.model, loop.cases, loop.seed, modes=planning_modes(run), induction_s=run.windows.induction_s
    )
    write_json_atomic(result.summary, Path(out) / "summary.json")
    return result.summary
