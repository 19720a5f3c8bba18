"""Decision support for one patient: what the policy suggests, what the critic prefers, and caveats.

The policy mean is the recommendation: it stays close to what clinicians did in similar states.
The greedy action (argmax of the Q-curve) is shown for insight, with a warning when it leaves
the clinicians' range, because a critic is least reliable exactly where the data is thin.

A clinician acts on milligrams, so the action is also given as the next dose (the simulator's dose
rule, `Regimen`) when the run's state holds the current dose. With the patient's rows so far, the
MAP-Bayesian PK fit from all their levels predicts the AUC24 and trough that dose would give.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dosewise.algos.bayesian_dosing import map_estimate, predict
from dosewise.algos.dosing_history import dosing_record, next_administration_h
from dosewise.algos.trained import TrainedIQL
from dosewise.data.loading import DataError, load_rows, load_table
from dosewise.data.schema import BINARY_FEATURES, FEATURE_UNITS, PHYSIOLOGICAL_BOUNDS, DataConfig
from dosewise.sim.vancomycin import AUC_TARGET, Regimen

GREEDY_DISAGREEMENT = 0.5  # |greedy - policy| beyond this (in action units) earns a warning
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a state value beyond this becomes inf inside the model

# Plain decimal or scientific notation only: float() would also take '1_2', 'nan', 'inf', 'infinity'
# and non-ASCII digits, none of which a clinician means when typing a lab value.
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

REGIMEN = Regimen()  # the dose rule the simulator applies to an action, and so the one the policy learned
TROUGH_MAX_MG_L = 20.0  # troughs above this go with more acute kidney injury
NEEDS_HISTORY = "the prediction needs the patient's history (--history)"


class StateError(ValueError):
    """A patient state that is missing a feature, names an unknown one, has a non-numeric value or one
    outside its physiological range, or on which the model's output is not finite."""


class PatientChoiceError(DataError):
    """A history with several patients and none chosen, or without the one chosen."""


@dataclass(frozen=True)
class Recommendation:
    state: dict[str, float]
    policy_action: float  # mean of the learned policy: the recommendation
    greedy_action: float  # argmax of Q over the action grid
    q_value: float  # Q(state, policy_action)
    greedy_q_value: float  # Q(state, greedy_action)
    q_curve: list[tuple[float, float]]  # (action, Q) over the grid
    warnings: list[str]
    # Features outside their physiological range that the user chose to keep (allow_out_of_range):
    # {"feature", "value", "unit", "bound" ("min" or "max"), "limit"}.
    overrides: list[dict] = field(default_factory=list)
    # The action in mg (None when the run's state has no dose_mg): the next dose per administration, the
    # interval it is given at (unchanged by the action) and the dose in force now.
    dose_mg: float | None = None
    interval_h: float | None = None
    current_dose_mg: float | None = None
    # With the patient's history: exposure under that regimen over the 24 h from its first dose
    # (`prediction_from_h`, the next administration, in the history's hours), from the MAP fit of `levels_used` levels.
    predicted_auc24: float | None = None  # mg*h/L
    predicted_trough: float | None = None  # mg/L, just before the first dose after those 24 h
    levels_used: int | None = None
    prediction_from_h: float | None = None
    notes: list[str] = field(default_factory=list)  # why a field above is None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HistoryPrediction:
    """What the recommended regimen would give one patient, from their MAP posterior."""

    auc24: float
    trough: float
    levels_used: int
    first_dose_h: float


def dose_for_action(action: float, current_dose_mg: float, regimen: Regimen = REGIMEN) -> float:
    """The next dose per administration an action means, as the simulator applies it (`Regimen.next_dose`)."""
    if not math.isfinite(action) or not math.isfinite(current_dose_mg) or current_dose_mg < 0:
        raise StateError(f"dose_for_action: expected a finite action and a current dose >= 0 mg, got {action} and {current_dose_mg}")
    return float(regimen.next_dose(np.array([current_dose_mg]), np.array([action]))[0])


def no_dose_note(regimen: Regimen = REGIMEN) -> str:
    return (
        "the run's state has no dose column (dose_mg), so the dose in mg and its prediction are not given; "
        f"the action is the relative change: next dose = current dose x (1 + {regimen.max_change:g} x action)"
    )


def load_history(history: str | Path | pd.DataFrame, config: DataConfig, source: str = "history") -> pd.DataFrame:
    """A history file (or its rows) through the training file's loader, so it gets the same checks."""
    if not isinstance(history, pd.DataFrame):
        return load_table(Path(history), config)[0]
    if history.empty:
        raise DataError(f"{source}: no rows; expected the patient's rows so far, one per charting time")
    return load_rows(history, config, source)[0]


def patient_rows(frame: pd.DataFrame, config: DataConfig, patient: str | None, source: str = "history") -> pd.DataFrame:
    """One patient's rows of a loaded history: the one there is, or `patient` among several."""
    patients = list(dict.fromkeys(frame[config.patient_id]))
    if patient is None:
        if len(patients) > 1:
            listed = ", ".join(patients[:20]) + (f" and {len(patients) - 20} more" if len(patients) > 20 else "")
            raise PatientChoiceError(
                f"{source} holds {len(patients)} patients ({listed}); choose one with --patient ID (patient= in the API)"
            )
        return frame
    if str(patient) not in patients:
        raise PatientChoiceError(
            f"{source}: no patient '{patient}'; it holds: {', '.join(patients[:20])}{' ...' if len(patients) > 20 else ''}"
        )
    return frame[frame[config.patient_id] == str(patient)].reset_index(drop=True)


def history_state(rows: pd.DataFrame, feature_names: Sequence[str]) -> dict[str, float]:
    """The state at the latest row: the decision being made is the one after it."""
    last = rows.iloc[-1]
    return {name: float(last[name]) for name in feature_names}


def predict_from_history(
    rows: pd.DataFrame, config: DataConfig, dose_mg: float, interval_h: float, regimen: Regimen = REGIMEN, source: str = "history"
) -> HistoryPrediction:
    """AUC24 and trough of `dose_mg` every `interval_h` from the next administration on, for the patient of
    `rows` (a loaded history with the record columns), their PK fitted to all their levels."""
    record = dosing_record(rows, config, regimen.max_rate_mg_h, source=source)
    first = next_administration_h(rows.sort_values(config.time, kind="stable"), config)
    estimate = map_estimate([record])
    exposure = predict(
        estimate, [record], np.array([dose_mg]), np.array([interval_h]), np.array([first]), max_rate_mg_h=regimen.max_rate_mg_h
    )
    return HistoryPrediction(
        auc24=float(exposure.auc24[0]), trough=float(exposure.trough[0]), levels_used=int(estimate.levels_used[0]), first_dose_h=first
    )


def exposure_warnings(prediction: HistoryPrediction, dose_mg: float, interval_h: float) -> list[str]:
    low, high = AUC_TARGET
    regimen = f"{dose_mg:,.0f} mg every {interval_h:g} h"
    found = []
    if not low <= prediction.auc24 <= high:
        found.append(
            f"predicted AUC24 {prediction.auc24:.0f} mg*h/L under {regimen} is outside the {low:g}-{high:g} mg*h/L target: "
            "check the dose against the patient's levels"
        )
    if prediction.trough > TROUGH_MAX_MG_L:
        found.append(
            f"predicted trough {prediction.trough:.1f} mg/L under {regimen} is above {TROUGH_MAX_MG_L:g} mg/L, where kidney injury becomes more likely"
        )
    return found


def parse_state(pairs: Sequence[str], feature_names: Sequence[str], allow_out_of_range: bool = False) -> dict[str, float]:
    """``["vanco_level=25", ...]`` -> {name: value}, every feature exactly once, within its
    physiological range unless `allow_out_of_range`."""
    state: dict[str, float] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep:
            raise StateError(f"--state {pair!r}: expected name=value, e.g. vanco_level=18.5")
        if name in state:
            raise StateError(f"--state {name}: given twice")
        state[name] = _number(name, text.strip())
    return validate_state(state, feature_names, allow_out_of_range)


def _number(name: str, value: object) -> float:
    """A finite float from a number (not a bool) or a plain decimal string; anything else is a StateError."""
    if isinstance(value, str):
        if not NUMBER.fullmatch(value.strip()):
            raise StateError(f"feature {name!r}: {value!r} is not a number; expected a finite decimal number such as 18.5 or 1.85e1")
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise StateError(f"feature {name!r}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise StateError(f"feature {name!r}: {value!r} is not a finite number") from None
    if not math.isfinite(number):
        raise StateError(f"feature {name!r}: {value!r} is not a finite number")
    if abs(number) > FLOAT32_MAX:
        raise StateError(f"feature {name!r}: {value!r} is too large; the model computes in 32-bit floats (at most {FLOAT32_MAX:.4g})")
    return number


def out_of_bounds(values: Mapping[str, float]) -> list[dict]:
    """Every feature outside its physiological range, with the bound it crosses."""
    found = []
    for name, value in values.items():
        if name not in PHYSIOLOGICAL_BOUNDS:
            continue
        low, high = PHYSIOLOGICAL_BOUNDS[name]
        if value < low or value > high:
            bound, limit = ("min", low) if value < low else ("max", high)
            found.append({"feature": name, "value": value, "unit": FEATURE_UNITS.get(name, ""), "bound": bound, "limit": limit})
    return found


def describe_override(item: Mapping[str, object]) -> str:
    """One line per out-of-range feature, for errors and the table output."""
    low, high = PHYSIOLOGICAL_BOUNDS[str(item["feature"])]
    unit = f" {item['unit']}" if item["unit"] else ""
    side = "below the minimum" if item["bound"] == "min" else "above the maximum"
    return f"{item['feature']} = {item['value']:g} is {side} {item['limit']:g} (physiological range [{low:g}, {high:g}]{unit})"


def validate_state(state: Mapping[str, object], feature_names: Sequence[str], allow_out_of_range: bool = False) -> dict[str, float]:
    """Every feature of the model exactly once, as a finite float; outside its physiological
    range only with `allow_out_of_range` (values typed in the wrong unit look like this)."""
    unknown = [k for k in state if k not in feature_names]
    if unknown:
        raise StateError(f"unknown feature(s) {', '.join(map(repr, unknown))}; the model uses: {', '.join(feature_names)}")
    missing = [k for k in feature_names if k not in state]
    if missing:
        raise StateError(f"missing feature(s) {', '.join(map(repr, missing))}; the model needs all of: {', '.join(feature_names)}")
    values = {k: _number(k, state[k]) for k in feature_names}
    for name in BINARY_FEATURES.intersection(values):
        if values[name] not in (0.0, 1.0):
            raise StateError(f"feature {name!r}: {values[name]:g} is not 0 or 1; expected 0 (no) or 1 (yes)")
    outside = out_of_bounds(values)
    if outside and not allow_out_of_range:
        raise StateError(
            "; ".join(describe_override(item) for item in outside)
            + ". Check the value and its unit, or override with --allow-out-of-range (allow_out_of_range=True in the API)"
        )
    return values


def require_finite(output: str, values: object) -> None:
    """A model output that is NaN or inf is refused: printing it would look like advice."""
    array = np.asarray(values, dtype=np.float64)
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise StateError(
            f"the model's {output} is not finite ({bad} of {array.size} values are NaN or inf) for this state; "
            "no recommendation can be given: the model is unusable here"
        )


def recommend(
    model: TrainedIQL, state: Mapping[str, object], allow_out_of_range: bool = False, history: pd.DataFrame | None = None
) -> Recommendation:
    """The policy's action, the next dose it means, the critic's view and the caveats for one state; refuses
    states outside the physiological ranges (unless `allow_out_of_range`, then recorded in `overrides`) and
    non-finite model outputs. `history` (one patient's loaded rows up to this state) adds the predicted exposure."""
    values = validate_state(state, model.feature_names, allow_out_of_range)
    obs = np.array([[values[k] for k in model.feature_names]], dtype=np.float32)
    grid = model.action_grid()
    curve = model.q_curve(obs, grid)[0]
    require_finite("Q-curve", curve)
    policy = float(model.policy_action(obs)[0])
    require_finite("policy action", policy)
    q_value = float(model.q_value(obs, np.array([policy]))[0])
    require_finite("Q value of the policy action", q_value)
    best = int(curve.argmax())
    warnings = [
        f"{name} = {values[name]:g} is outside the training range [{lo:g}, {hi:g}]: the model extrapolates"
        for name, (lo, hi) in model.feature_ranges.items()
        if not lo <= float(np.float32(values[name])) <= hi  # ranges were taken from the float32 training tensors
    ]
    if abs(float(grid[best]) - policy) > GREEDY_DISAGREEMENT:
        warnings.append(
            f"greedy action {grid[best]:+.2f} is far from the policy's {policy:+.2f}: the Q-curve peaks where the "
            "clinicians' data is thin; prefer the policy's action, the recommendation"
        )
    regimen: dict[str, object] = {"notes": []}
    if "dose_mg" in values:
        current = values["dose_mg"]
        regimen.update(current_dose_mg=current, dose_mg=dose_for_action(policy, current), interval_h=values.get("interval_h"))
        if history is None:
            regimen["notes"] = [NEEDS_HISTORY]
        elif regimen["interval_h"] is None:
            regimen["notes"] = ["the run's state has no interval column (interval_h), so no exposure can be predicted"]
        else:
            found = predict_from_history(history, model.data_config, regimen["dose_mg"], regimen["interval_h"])
            require_finite("predicted exposure", [found.auc24, found.trough])
            regimen.update(
                predicted_auc24=found.auc24,
                predicted_trough=found.trough,
                levels_used=found.levels_used,
                prediction_from_h=found.first_dose_h,
            )
            warnings += exposure_warnings(found, regimen["dose_mg"], regimen["interval_h"])
    else:
        regimen["notes"] = [no_dose_note()]
    return Recommendation(
        state=values,
        policy_action=policy,
        greedy_action=float(grid[best]),
        q_value=q_value,
        greedy_q_value=float(curve[best]),
        q_curve=[(float(a), float(q)) for a, q in zip(grid, curve)],
        warnings=warnings,
        overrides=out_of_bounds(values),
        **regimen,
    )
