"""Decision support for one anesthesia case with a trained planner: the next propofol and
remifentanil rates, what the model expects BIS and MAP to do under them and under keeping the
current rates, and the caveats a clinician should read first.

The input is the case so far, loaded by `load_cases` with the run's data contract, and read by
the model exactly as a training window is (`decision_inputs`, one code path with `build_windows`).
The decision is made at the last charted step: the model sees the vitals of every step up to it
and the rates set up to the step before, as at step t of a training window, and proposes the
rates for that step. The rates charted on the last row are therefore not an input: in the
training layout they are the clinician's decision at that step, which the model's replaces. The
rates in force before the decision ("current") are those of the row before, 0 for a one-row
history (nothing infused before the case started). The file must start at the case start: the
option flag (induction) and the pump's concentrations count from its first row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from dosewise.algos.recommend import require_finite
from dosewise.config import ConfigError
from dosewise.data.anesthesia import CASE_ID, COVARIATES, RATE_MAX, TIME, VITALS, CaseReport
from dosewise.data.loading import DataError
from dosewise.data.windows import decision_inputs
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.model import N_VITALS, PlannerModel, expected_class
from dosewise.planner.mpc import current_rates
from dosewise.planner.policy import PlanningMode, planner_policy
from dosewise.sim.anesthesia.cases import PROPOFOL_MG_PER_ML, REMIFENTANIL_UG_PER_ML

PLANNING_MODES: tuple[str, ...] = ("argmax", "beam", "mcts", "mpc")
# A current vital or a covariate further than this many standard deviations from the training
# windows' mean earns a warning. The run stores the training windows' mean and SD (`PlannerStats`),
# not their range; 4 SD flags values the training data holds very few of. Vitals are checked at the
# decision step only, and not during induction: awake values (BIS near 100) open every case.
OUT_OF_RANGE_SD = 4.0
# Where the plan's future rates come from, by planning mode.
PLAN_SOURCES = {
    "argmax": "the chosen rates held for every step (argmax plans no sequence)",
    "beam": "beam search's best sequence, its last rates held past its depth",
    "mcts": "the chosen rates held for every step (the search keeps no sequence)",
    "mpc": "the MPC candidate the rates come from: the chosen rates held for every step",
}


@dataclass(frozen=True)
class Prediction:
    """The model's expectation over the next `pre_len` steps under one sequence of rates."""

    propofol_rate_ml_h: list[int]  # rates set at steps t..t+K-1
    remifentanil_rate_ml_h: list[int]
    bis: list[float]  # expected charted BIS at steps t+1..t+K (mean of the BIS head's 101 classes)
    map: list[float]  # expected charted MAP, mmHg, at steps t+1..t+K (mean of the MAP head's 201 classes)
    # An uncertainty band needs several models; a planner run holds one, so None.
    band: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "propofol_rate_ml_h": [int(x) for x in self.propofol_rate_ml_h],
            "remifentanil_rate_ml_h": [int(x) for x in self.remifentanil_rate_ml_h],
            "bis": [float(x) for x in self.bis],
            "map": [float(x) for x in self.map],
            "band": None if self.band is None else {k: [float(x) for x in v] for k, v in self.band.items()},
        }


@dataclass(frozen=True)
class PlannerRecommendation:
    """The next rates for one case and what the model expects of them (module docstring)."""

    case_id: str
    time_s: float  # time of the decision step: the history's last step
    history_steps: int  # steps of the loaded case; the model reads the last `window_steps`
    window_steps: int  # the model's history window (max_len)
    step_s: float  # seconds per step
    mode: str  # planning mode that chose the rates
    max_rate_ml_h: tuple[int, int]  # dose limits used, propofol and remifentanil
    weight_kg: float
    propofol_rate_ml_h: int  # mL/h of propofol 20 mg/mL to set now
    remifentanil_rate_ml_h: int  # mL/h of remifentanil 20 µg/mL to set now
    propofol_mg_kg_h: float
    remifentanil_ug_kg_min: float
    current_rate_ml_h: tuple[int, int]  # rates in force before the decision (the row before the last)
    plan: Prediction  # under the planned rates (`plan_source`)
    keep_current: Prediction  # under the current rates held for every step
    plan_source: str
    # Learned return estimate of each sequence, in reward units: Σ_k γ^k r̂_{k+1} + γ^K V̂(s_K), the
    # reward head over the K unrolled steps and the value head after them (γ: windows.gamma). The
    # value head regresses the clinicians' returns: a rough comparison, not what MPC optimises.
    value_plan: float
    value_keep_current: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # checks that do not apply to this run
    members: int = 1  # models that predicted; planner runs have one

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (the numbers were checked finite): `json.dumps(..., allow_nan=False)` works."""
        return {
            "case_id": self.case_id,
            "time_s": float(self.time_s),
            "history_steps": int(self.history_steps),
            "window_steps": int(self.window_steps),
            "step_s": float(self.step_s),
            "mode": self.mode,
            "max_rate_ml_h": {"propofol": int(self.max_rate_ml_h[0]), "remifentanil": int(self.max_rate_ml_h[1])},
            "weight_kg": float(self.weight_kg),
            "propofol_rate_ml_h": int(self.propofol_rate_ml_h),
            "remifentanil_rate_ml_h": int(self.remifentanil_rate_ml_h),
            "propofol_mg_kg_h": float(self.propofol_mg_kg_h),
            "remifentanil_ug_kg_min": float(self.remifentanil_ug_kg_min),
            "current_rate_ml_h": {"propofol": int(self.current_rate_ml_h[0]), "remifentanil": int(self.current_rate_ml_h[1])},
            "predicted": {
                "steps": len(self.plan.bis),
                "plan_source": self.plan_source,
                "plan": self.plan.to_dict(),
                "keep_current": self.keep_current.to_dict(),
            },
            "value": {"plan": float(self.value_plan), "keep_current": float(self.value_keep_current)},
            "members": int(self.members),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def propofol_mg_kg_h(rate_ml_h: float, weight_kg: float) -> float:
    return float(rate_ml_h) * PROPOFOL_MG_PER_ML / weight_kg


def remifentanil_ug_kg_min(rate_ml_h: float, weight_kg: float) -> float:
    return float(rate_ml_h) * REMIFENTANIL_UG_PER_ML / 60.0 / weight_kg


@torch.no_grad()
def recommend_planner(
    model: PlannerModel,
    run: PlannerRunConfig,
    frame: pd.DataFrame,
    case_id: str | None = None,
    mode: str | None = None,
    max_rate: tuple[int, int] | None = None,
    report: CaseReport | None = None,
) -> PlannerRecommendation:
    """The next rates for one case of a frame from `load_cases` (the case so far).

    `case_id` picks the case when the frame holds several; `mode` defaults to the run's
    closed_loop.default_mode and `max_rate` (mL/h, propofol and remifentanil) to its
    closed_loop.max_rate. `report`, the load report of the frame, adds the loader's repairs
    (carried-forward gaps, masked artefacts, trimmed steps) to the warnings. Bad options are a
    ConfigError, an unusable case a DataError, a non-finite model output a StateError.
    """
    mode = run.closed_loop.default_mode if mode is None else mode
    if mode not in PLANNING_MODES:
        raise ConfigError(f"unknown planning mode {mode!r}; expected one of: {', '.join(PLANNING_MODES)}")
    limits = _check_limits(run.closed_loop.max_rate if max_rate is None else max_rate)
    case = _select_case(frame, case_id, report)
    rows = frame[frame[CASE_ID].astype(str) == case]
    step_s = float(run.data.step_s)
    gaps = np.diff(np.sort(rows[TIME].to_numpy(np.float64)))
    if gaps.size and not np.allclose(gaps, step_s, rtol=1e-6, atol=1e-6):
        raise DataError(
            f"{_where(report)}case '{case}': its steps are {gaps[0]:g} s apart; the model was trained on steps of {step_s:g} s "
            "(load the history with the run's data config)"
        )
    weight = float(rows["weight"].iloc[0])
    if not weight > 0:
        raise DataError(f"{_where(report)}case '{case}': weight {weight:g} kg is not positive; the doses per kg need the patient's weight")

    inputs = decision_inputs(rows, run.windows)
    history, history_mask, static = (torch.from_numpy(a) for a in (inputs.history, inputs.history_mask, inputs.static))
    decision = planner_policy(run, model, _mode(mode), limits).decide(history, history_mask, static)
    action = decision.action[0]
    current = current_rates(history)[0]
    horizon = model.pre_len
    plan_rates = _held(decision.plan[0] if decision.plan is not None else action[None], horizon)
    keep_rates = _held(current[None], horizon)
    memory, padding = model.represent(history, history_mask, static)
    plan, value_plan = _predict(model, memory, padding, plan_rates, run.windows.gamma)
    keep, value_keep = _predict(model, memory, padding, keep_rates, run.windows.gamma)
    for name, values in (("BIS and MAP predictions", plan.bis + plan.map + keep.bis + keep.map), ("value", [value_plan, value_keep])):
        require_finite(name, values)

    steps = int(inputs.steps[0])
    warnings = _history_warnings(steps, model.max_len, step_s, case, float(inputs.times[0]), report)
    notes = ["one model: no uncertainty band (band is null) and no disagreement between ensemble members to report"]
    range_warnings, range_note = _range_warnings(model, inputs.history[0], inputs.history_mask[0], inputs.static[0])
    warnings += range_warnings
    notes += [range_note] if range_note else []
    ppf, rftn = int(action[0]), int(action[1])
    return PlannerRecommendation(
        case_id=case,
        time_s=float(inputs.times[0]),
        history_steps=steps,
        window_steps=model.max_len,
        step_s=step_s,
        mode=mode,
        max_rate_ml_h=limits,
        weight_kg=weight,
        propofol_rate_ml_h=ppf,
        remifentanil_rate_ml_h=rftn,
        propofol_mg_kg_h=propofol_mg_kg_h(ppf, weight),
        remifentanil_ug_kg_min=remifentanil_ug_kg_min(rftn, weight),
        current_rate_ml_h=(int(current[0]), int(current[1])),
        plan=plan,
        keep_current=keep,
        plan_source=PLAN_SOURCES[mode],
        value_plan=value_plan,
        value_keep_current=value_keep,
        warnings=warnings,
        notes=notes,
    )


def _mode(mode: str) -> PlanningMode:
    return mode  # type: ignore[return-value]  # checked against PLANNING_MODES


def _check_limits(limits: tuple[int, int]) -> tuple[int, int]:
    checked = []
    for name, value in zip(("propofol", "remifentanil"), limits, strict=True):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= RATE_MAX:
            raise ConfigError(f"the largest {name} rate must be a whole number of mL/h in 0..{RATE_MAX}, got {value!r}")
        checked.append(int(value))
    return checked[0], checked[1]


def _where(report: CaseReport | None) -> str:
    return f"{report.path}: " if report is not None else ""


def _select_case(frame: pd.DataFrame, case_id: str | None, report: CaseReport | None) -> str:
    """The case to recommend for: the only one, or `case_id`; a DataError lists the choices."""
    ids = sorted(frame[CASE_ID].astype(str).unique())
    where = _where(report)
    dropped = report.cases_dropped if report is not None else {}
    if case_id is None:
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise DataError(f"{where}the history holds no usable step")
        raise DataError(f"{where}the history holds {len(ids)} cases; choose one with --case-id (case_id=...): {', '.join(ids)}")
    case_id = str(case_id)
    if case_id in ids:
        return case_id
    if case_id in dropped:
        raise DataError(f"{where}case '{case_id}' cannot be used: {dropped[case_id]}")
    raise DataError(f"{where}no case '{case_id}' in the history; its cases: {', '.join(ids) or 'none'}")


def _held(rates: Tensor, steps: int) -> Tensor:
    """A sequence of rates [k, 2] cut or extended to `steps`, its last rates held."""
    rates = rates[:steps]
    return torch.cat([rates, rates[-1:].expand(steps - rates.shape[0], -1)]) if rates.shape[0] < steps else rates


def _predict(model: PlannerModel, memory: Tensor, padding: Tensor, rates: Tensor, gamma: float) -> tuple[Prediction, float]:
    """BIS and MAP expected under `rates` [K, 2] over the unrolled steps, and the learned return estimate."""
    states = model.unroll(memory, padding, rates[None])[0]  # [K, d] s_1..s_K
    rewards = model.reward_in_units(model.reward(states)).double()
    discount = gamma ** torch.arange(len(rewards), dtype=torch.float64)
    final = model.value_in_units(model.value(states[-1])).double()
    value = float((discount * rewards).sum() + gamma ** len(rewards) * final)
    prediction = Prediction(
        propofol_rate_ml_h=rates[:, 0].tolist(),
        remifentanil_rate_ml_h=rates[:, 1].tolist(),
        bis=expected_class(model.bis_head(states)).tolist(),
        map=expected_class(model.map_head(states)).tolist(),
    )
    return prediction, value


def _history_warnings(steps: int, window: int, step_s: float, case: str, time_s: float, report: CaseReport | None) -> list[str]:
    """What the history lacks, and what the loader repaired in it."""
    found = []
    if steps < window:
        found.append(
            f"the history has {steps} step{'s' if steps != 1 else ''} ({steps * step_s / 60:g} min) of the {window} "
            f"({window * step_s / 60:g} min) the model reads: the missing steps are empty, as early in a training case"
        )
    if report is None:
        return found
    where = "the file" if report.cases == 1 else f"the file's {report.cases} cases (counted over all of them)"
    carried = {name: count for name, count in report.values_carried_forward.items() if count}
    if carried:
        listed = ", ".join(f"{name} {count}" for name, count in carried.items())
        found.append(f"values carried forward over gaps in {where} (steps per track): {listed}; the model sees the last value repeated")
    masked = report.artefacts_by_case.get(case, 0)
    if masked:
        found.append(
            f"{masked} vital value{'s' if masked != 1 else ''} of case '{case}' outside the physiological bounds were masked as missing"
        )
    if report.steps_trimmed:
        found.append(
            f"{report.steps_trimmed} step{'s' if report.steps_trimmed != 1 else ''} of {where} were trimmed (before every track "
            f"was recorded, or after a vital stopped): the decision step is the last complete one, at {time_s:g} s"
        )
    return found


def _range_warnings(model: PlannerModel, history: np.ndarray, mask: np.ndarray, static: np.ndarray) -> tuple[list[str], str | None]:
    """The decision step's vitals (after induction) and the covariates further than `OUT_OF_RANGE_SD`
    from the training windows' mean (the model's stored statistics)."""
    stats = {name: getattr(model, name).detach().double().numpy() for name in ("vital_mean", "vital_std", "static_mean", "static_std")}
    if not stats["vital_mean"].any() and (stats["vital_std"] == 1.0).all():
        return [], "the model stores no training statistics: values outside the training data were not checked"
    found = []
    current = history[mask][-1:]  # [1, F], the decision step
    in_induction = bool(current[0, N_VITALS + 2] > 0.5)  # the option flag follows the vitals and both previous rates
    groups = [(COVARIATES, static[None].astype(np.float64), stats["static_mean"], stats["static_std"])]
    if not in_induction:
        groups.insert(0, (VITALS, current[:, :N_VITALS].astype(np.float64), stats["vital_mean"], stats["vital_std"]))
    for names, values, mean, sd in groups:
        z = (values - mean) / sd
        for j, name in enumerate(names):
            worst = int(np.abs(z[:, j]).argmax())
            if abs(z[worst, j]) > OUT_OF_RANGE_SD:
                found.append(
                    f"{name} = {values[worst, j]:g} is {abs(z[worst, j]):.1f} SD from the training windows' mean "
                    f"{mean[j]:.4g} (SD {sd[j]:.3g}): the model extrapolates"
                )
    return (
        found,
        f"values were checked against the training windows' mean and SD (the run stores no range): beyond {OUT_OF_RANGE_SD:g} SD earns a warning",
    )
