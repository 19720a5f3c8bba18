"""A trained planner's environment model against the simulator's truth, from held-out states:
what it predicts over its horizon for the clinician's actual actions, and what it predicts a
different dose would do (counterfactual dose responses). Shared by `dosewise report` and
bench/planner_diagnosis.py, so both measure the same thing."""

from __future__ import annotations

import numpy as np
import torch

from dosewise.planner.model import RATE_LEVELS, PlannerModel, expected_class
from dosewise.planner.policy import history_window
from dosewise.sim.anesthesia.cases import CaseRun, CaseSpec, sample_cases
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist

DECISION_MINUTES = (15, 30, 45, 60, 90)
HELD_OUT_SEED = 300_000  # cohorts of the diagnosis; never a training seed
# Rate changes of the counterfactual test: (propofol, remifentanil) as a factor of the current rate,
# or "max" for the pump's top rate; None keeps that drug's rate.
VARIANTS: dict[str, tuple[float | str | None, float | str | None]] = {
    "propofol x0": (0.0, None),
    "propofol x0.5": (0.5, None),
    "propofol x1.5": (1.5, None),
    "propofol max": ("max", None),
    "remifentanil x0": (None, 0.0),
    "remifentanil x0.5": (None, 0.5),
    "remifentanil x1.5": (None, 1.5),
    "remifentanil max": (None, "max"),
    "both x0": (0.0, 0.0),
    "both x1.5": (1.5, 1.5),
    "propofol x1.5, remifentanil x0.5": (1.5, 0.5),
    "propofol x0.5, remifentanil x1.5": (0.5, 1.5),
}
# The propofol-only changes: the dose-response figure of `dosewise report`.
PROPOFOL_VARIANTS = {name: VARIANTS[name] for name in ("propofol x0", "propofol x0.5", "propofol x1.5", "propofol max")}

# A held-out state: (decision step t0, the run cloned at t0, the clinician's next pre_len actions [N, pre_len, 2]).
Snapshot = tuple[int, CaseRun, np.ndarray]


def clinician_snapshots(
    n_cases: int, pre_len: int, spec: CaseSpec, seed: int, minutes: tuple[int, ...] = DECISION_MINUTES, to_end: bool = False
) -> tuple[list[Snapshot], CaseRun]:
    """Held-out cases (cohort from `seed`, clinician `seed + 1`, simulator `seed + 2`) under the
    clinician, cloned at each decision minute; returns the snapshots and the run itself, driven to
    the end of every case with `to_end` (else just past the last snapshot's horizon)."""
    cohort = sample_cases(n_cases, np.random.default_rng(seed), spec)
    clinician = SimulatedAnesthesiologist(cohort, seed + 1, step_s=spec.step_s)
    run = CaseRun(cohort, seed + 2, spec)
    taken: dict[int, CaseRun] = {}
    last = max(minutes) + pre_len
    while not run.done and (to_end or run.k <= last):
        if run.k in minutes:
            taken[run.k] = run.clone()
        run.advance(*clinician(run.history()))
    # A state whose horizon outlasts every case has no complete future to compare with: left out.
    states = [(t0, state, run.rates[t0 : t0 + pre_len].transpose(1, 0, 2)) for t0, state in taken.items() if t0 + pre_len <= run.k]
    return states, run


def snapshots(n_cases: int, pre_len: int, spec: CaseSpec, seed: int) -> list[Snapshot]:
    """Held-out cases under the clinician, cloned at each decision minute: (t0, the run at t0, the
    clinician's actions over the next pre_len steps [N, pre_len, 2]); cases too short are marked by
    the run's own `steps`."""
    return clinician_snapshots(n_cases, pre_len, spec, seed)[0]


def follow(run: CaseRun, actions: np.ndarray) -> int:
    """Advance `run` through the actions [N, K, 2]; returns the decision step they started at."""
    t0 = run.k
    for j in range(actions.shape[1]):
        run.advance(actions[:, j, 0], actions[:, j, 1])
    return t0


def charted(run: CaseRun, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Charted (BIS, MAP) after each of the actions [N, K, 2], each [N, K]; `run` is advanced."""
    t0 = follow(run, actions)
    after = run.vitals[t0 + 1 : t0 + actions.shape[1] + 1]  # [K, N, 5] charted before the next decisions
    return after[..., 0].T, after[..., 1].T


def truth(run: CaseRun, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free (BIS, MAP) at the charting instants after each action, each [N, K]."""
    t0 = follow(run, actions)
    at = (t0 + np.arange(1, actions.shape[1] + 1)) * run.spec.step_s - 1
    return run.bis_true[at].T.astype(np.float64), run.map_true[at].T.astype(np.float64)


def valid_rows(run: CaseRun, k: int) -> np.ndarray:
    """Cases with all k steps after the decision inside the case (their charted values exist)."""
    return run.steps > run.k + k


@torch.no_grad()
def model_prediction(model: PlannerModel, run: CaseRun, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's expected charted (BIS, MAP) after each action [N, K, 2] from the charted history."""
    window, mask, static = history_window(run.history(), model.max_len, concentrations=model.concentrations)
    memory, padding = model.represent(torch.from_numpy(window), torch.from_numpy(mask), torch.from_numpy(static))
    states = model.unroll(memory, padding, torch.from_numpy(actions).long())
    return expected_class(model.bis_head(states)).double().numpy(), expected_class(model.map_head(states)).double().numpy()


def horizon_predictions(model: PlannerModel, states: list[Snapshot]) -> dict[str, np.ndarray]:
    """At every held-out state with its whole horizon inside the case, the model's expected BIS and
    MAP after each of the clinician's next pre_len actions next to what was charted (rounded to
    whole points, as the model is trained on) and the noise-free truth: each [n_states, K]."""
    k = model.pre_len
    found: dict[str, list[np.ndarray]] = {f"{who}_{vital}": [] for who in ("pred", "charted", "true") for vital in ("bis", "map")}
    for _, state, actions in states:
        rows = valid_rows(state, k)
        pred = model_prediction(model, state, actions)
        observed = charted(state.clone(), actions)
        noise_free = truth(state.clone(), actions)
        for j, vital in enumerate(("bis", "map")):
            found[f"pred_{vital}"].append(pred[j][rows])
            found[f"charted_{vital}"].append(np.round(observed[j])[rows])
            found[f"true_{vital}"].append(noise_free[j][rows])
    return {name: np.concatenate(values) if values else np.zeros((0, k)) for name, values in found.items()}


def variant_rates(current: np.ndarray, change: float | str | None) -> np.ndarray:
    if change is None:
        return current
    if change == "max":
        return np.full_like(current, RATE_LEVELS - 1)
    return np.clip(np.rint(current * float(change)), 0, RATE_LEVELS - 1).astype(current.dtype)


def counterfactual_changes(
    model: PlannerModel, states: list[Snapshot], variants: dict[str, tuple[float | str | None, float | str | None]] = VARIANTS
) -> dict[str, dict[str, np.ndarray]]:
    """From each held-out state, each variant's rates held for pre_len steps against holding the
    current rates: the true change of BIS and MAP (noise-free, same stimulation) and the model's
    predicted change, per variant {true_bis, pred_bis, true_map, pred_map} each [n_states, K]."""
    k = model.pre_len
    found: dict[str, dict[str, list]] = {name: {"true_bis": [], "pred_bis": [], "true_map": [], "pred_map": []} for name in variants}
    for _, state, _ in states:
        rows = valid_rows(state, k)
        current = state.rates[state.k - 1] if state.k else np.zeros((state.cohort.n, 2), dtype=np.int64)
        hold = np.repeat(current[:, None, :], k, axis=1)
        base_bis, base_map = truth(state.clone(), hold)
        pred_base_bis, pred_base_map = model_prediction(model, state, hold)
        for name, (ppf, rftn) in variants.items():
            rates = np.stack([variant_rates(current[:, 0], ppf), variant_rates(current[:, 1], rftn)], axis=1)
            plan = np.repeat(rates[:, None, :], k, axis=1)
            bis, mean_ap = truth(state.clone(), plan)
            pred_bis, pred_map = model_prediction(model, state, plan)
            found[name]["true_bis"].append((bis - base_bis)[rows])
            found[name]["pred_bis"].append((pred_bis - pred_base_bis)[rows])
            found[name]["true_map"].append((mean_ap - base_map)[rows])
            found[name]["pred_map"].append((pred_map - pred_base_map)[rows])
    return {
        name: {key: np.concatenate(values) if values else np.zeros((0, k)) for key, values in arrays.items()}
        for name, arrays in found.items()
    }


def counterfactual(model: PlannerModel, states: list[Snapshot], variants=VARIANTS) -> dict:
    """`counterfactual_changes` summarised per variant and over all of them (`change_accuracy`)."""
    changes = counterfactual_changes(model, states, variants)
    result, every = {}, {"bis": ([], []), "map": ([], [])}
    for name, arrays in changes.items():
        entry = {}
        for vital in ("bis", "map"):
            true, pred = arrays[f"true_{vital}"], arrays[f"pred_{vital}"]
            every[vital][0].append(true)
            every[vital][1].append(pred)
            entry[vital] = change_accuracy(true, pred)
        result[name] = entry
    overall = {vital: change_accuracy(np.concatenate(t), np.concatenate(p)) for vital, (t, p) in every.items()}
    return {"variants": result, "overall": overall}


def change_accuracy(true: np.ndarray, pred: np.ndarray) -> dict:
    """true and predicted changes [n, K]: per-horizon mean of each, MAE, and sign agreement where
    |true| >= 1 (with how many such)."""
    counted = np.abs(true) >= 1.0
    agree = (np.sign(true) == np.sign(pred)) & counted
    return {
        "true_mean": true.mean(axis=0).tolist(),
        "pred_mean": pred.mean(axis=0).tolist(),
        "mae": np.abs(true - pred).mean(axis=0).tolist(),
        "sign_agreement": float(agree.sum() / max(counted.sum(), 1)),
        "sign_counted": int(counted.sum()),
    }
