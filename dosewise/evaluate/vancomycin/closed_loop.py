"""Closed-loop evaluation: the learned policy and the simulated clinician on the same new patients.

This is the ground truth offline statistics cannot give. Both policies treat the same held-out
cohort with the same random draws (common random numbers), so every difference in outcome comes
from their decisions; intervals resample patients, and the difference is a paired bootstrap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dosewise.evaluate.stats import bootstrap_ci, bootstrap_indices
from dosewise.sim.vancomycin import (
    AUC_TARGET,
    DECISION_HOURS,
    Policy,
    Trajectories,
    VancomycinConfig,
    rollout,
    sample_cohort,
)
from dosewise.sim.vancomycin_clinician import VancomycinClinician

STEPS_PER_DAY = 24 // DECISION_HOURS
N_BOOTSTRAP = 2000


@dataclass(frozen=True)
class PatientOutcomes:
    """Per-patient outcomes of one rollout; arrays are [N]."""

    total_return: np.ndarray  # undiscounted sum of rewards over the course
    aki: np.ndarray  # bool, an AKI started during the course
    days: np.ndarray  # complete treatment days
    days_in_target: np.ndarray  # of those, days with AUC24 in 400-600

    @classmethod
    def from_trajectories(cls, traj: Trajectories) -> PatientOutcomes:
        mask = traj.mask
        days = traj.steps // STEPS_PER_DAY
        day_end = traj.cumulative_auc[STEPS_PER_DAY - 1 :: STEPS_PER_DAY]  # [D, N] cumulative AUC at each day's end
        daily_auc = np.diff(day_end, axis=0, prepend=0.0)
        in_target = (daily_auc >= AUC_TARGET[0]) & (daily_auc <= AUC_TARGET[1])
        counted = np.arange(daily_auc.shape[0])[:, None] < days[None, :]
        return cls(
            total_return=(traj.rewards * mask).sum(axis=0),
            aki=(traj.new_aki & mask).any(axis=0),
            days=days,
            days_in_target=(in_target & counted).sum(axis=0),
        )


def _metrics(o: PatientOutcomes) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each metric as a function of a [B, N] index matrix -> [B] values (point estimate: identity rows)."""
    return {
        "auc_in_target_frac": lambda idx: o.days_in_target[idx].sum(-1) / np.maximum(o.days[idx].sum(-1), 1),
        "aki_rate": lambda idx: o.aki[idx].mean(-1),
        "mean_return": lambda idx: o.total_return[idx].mean(-1),
    }


def summarize(outcomes: PatientOutcomes, indices: np.ndarray) -> dict:
    identity = np.arange(outcomes.aki.shape[0])[None, :]
    return {name: bootstrap_ci(f, indices, f(identity)[0]) for name, f in _metrics(outcomes).items()}


def compare(learned: PatientOutcomes, reference: PatientOutcomes, indices: np.ndarray) -> dict:
    """Paired differences learned - reference with intervals from the same resampled patients."""
    identity = np.arange(learned.aki.shape[0])[None, :]
    mine, theirs = _metrics(learned), _metrics(reference)
    return {
        name: bootstrap_ci(
            lambda idx, f=mine[name], g=theirs[name]: f(idx) - g(idx), indices, (mine[name](identity) - theirs[name](identity))[0]
        )
        for name in mine
    }


def bayesian_baselines(config: VancomycinConfig = VancomycinConfig()) -> dict[str, Policy]:
    """Model-informed dosing to set beside a learned policy: through the same action space, and setting the regimen freely."""
    from dosewise.algos.bayesian_policy import BayesianDosingPolicy

    return {"bayesian": BayesianDosingPolicy(config=config), "bayesian_free": BayesianDosingPolicy(free_regimen=True, config=config)}


def evaluate_vancomycin(
    policy: Policy,
    n_patients: int = 1000,
    seed: int = 1000,
    config: VancomycinConfig = VancomycinConfig(),
    features: Sequence[str] | None = None,
    baselines: Mapping[str, Policy] | None = None,
) -> dict:
    """Run ``policy`` and the simulated clinician on ``n_patients`` new patients drawn from ``seed``.

    ``policy`` sees the simulator's columns ``features`` by name; by default those it declares (a
    trained model's ``feature_names``: the 7 charted ones, or those and the dose-aware ones) or else
    the 7 charted ones, which the clinician reads too.

    Each of ``baselines`` (e.g. `bayesian_baselines`) treats the same patients with the same random draws
    and adds ``result[name] = {label, outcomes, difference, difference_vs_learned}``: its outcomes, the
    paired difference baseline - clinician and baseline - learned policy. Without them the result is as before."""
    seeds = np.random.SeedSequence(seed).spawn(3)
    cohort = sample_cohort(n_patients, np.random.default_rng(seeds[0]), config)
    sim_seed = int(seeds[1].generate_state(1)[0])
    clinician = VancomycinClinician(cohort, int(seeds[2].generate_state(1)[0]))
    learned = PatientOutcomes.from_trajectories(rollout(cohort, policy, sim_seed, config, features))
    reference = PatientOutcomes.from_trajectories(rollout(cohort, clinician, sim_seed, config))
    indices = bootstrap_indices(n_patients, N_BOOTSTRAP, seed)
    result = {
        "patients": n_patients,
        "seed": seed,
        "patient_days": int(learned.days.sum()),
        "learned": summarize(learned, indices),
        "clinician": summarize(reference, indices),
        "difference": compare(learned, reference, indices),
    }
    for name, baseline in (baselines or {}).items():
        if name in result:
            raise ValueError(f"evaluate_vancomycin: baseline name {name!r} clashes with a key of the result")
        outcomes = PatientOutcomes.from_trajectories(rollout(cohort, baseline, sim_seed, config))
        result[name] = {
            "label": str(getattr(baseline, "label", name)),
            "outcomes": summarize(outcomes, indices),
            "difference": compare(outcomes, reference, indices),
            "difference_vs_learned": compare(outcomes, learned, indices),
        }
    return result
