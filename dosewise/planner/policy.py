"""The trained planner as a closed-loop case policy: turns a `CaseHistory` into the model's input
window (the same layout as `build_windows`) and returns the argmax rates, plus the closed-loop
comparison with the simulated anesthesiologist on held-out simulated cases."""

from __future__ import annotations

import numpy as np
import torch

from dosewise.evaluate.anesthesia_closed_loop import evaluate_policies
from dosewise.planner.model import PlannerModel
from dosewise.sim.anesthesia_cases import CaseCohort, CaseHistory, CaseSpec
from dosewise.sim.anesthesia_clinician import SimulatedAnesthesiologist


def history_window(history: CaseHistory, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's input at decision step t, as `build_windows` makes it from a charted case.

    Returns history [N, max_len, 7] float32 (vitals rounded to 0.1 as the charted dataset is,
    then the rates set one step before, 0 before the case), history_mask [N, max_len] bool
    (real steps right-aligned) and static [N, 5] float32 (age, sex, height, weight, asa,
    rounded like `simulate_cases`).
    """
    n, t = history.vitals.shape[0], history.t
    previous = np.zeros((n, t + 1, 2), dtype=np.float64)
    previous[:, 1:] = history.rates[:, :t]
    steps = np.concatenate([np.round(history.vitals, 1), previous], axis=2)[:, -max_len:]  # [N, <=L, 7]
    real = steps.shape[1]
    window = np.zeros((n, max_len, steps.shape[2]), dtype=np.float32)
    window[:, max_len - real :] = steps
    mask = np.zeros((n, max_len), dtype=bool)
    mask[:, max_len - real :] = True
    cov = history.cohort.covariates
    static = np.stack(
        [np.round(cov.age), cov.sex, np.round(cov.height, 1), np.round(cov.weight, 1), history.cohort.asa], axis=1
    ).astype(np.float32)
    return window, mask, static


class PlannerPolicy:
    """`policy(history) -> (ppf [N], rftn [N])`: the argmax of the planner's policy heads."""

    def __init__(self, model: PlannerModel) -> None:
        self.model = model.eval()

    def __call__(self, history: CaseHistory) -> tuple[np.ndarray, np.ndarray]:
        window, mask, static = history_window(history, self.model.max_len)
        levels = self.model.act(torch.from_numpy(window), torch.from_numpy(mask), torch.from_numpy(static)).numpy()
        return levels[:, 0].astype(np.int64), levels[:, 1].astype(np.int64)


def closed_loop_comparison(model: PlannerModel, n_cases: int, seed: int, spec: CaseSpec | None = None) -> dict:
    """The planner (argmax) and the simulated anesthesiologist (the behaviour policy) on the same
    `n_cases` held-out simulated cases (`evaluate_policies`, common random numbers)."""
    spec = spec or CaseSpec()

    def clinician(cohort: CaseCohort) -> SimulatedAnesthesiologist:
        return SimulatedAnesthesiologist(cohort, seed + 1, step_s=spec.step_s)

    return evaluate_policies(
        {"planner_argmax": lambda cohort: PlannerPolicy(model), "simulated_anesthesiologist": clinician},
        n_cases=n_cases,
        seed=seed,
        spec=spec,
    )
