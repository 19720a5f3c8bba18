"""Decision support for one patient: what the policy suggests, what the critic prefers, and caveats.

The policy mean is the recommendation: it stays close to what clinicians did in similar states.
The greedy action (argmax of the Q-curve) is shown for insight, with a warning when it leaves
the clinicians' range, because a critic is least reliable exactly where the data is thin.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from dosewise.algos.trained import TrainedIQL
from dosewise.data.schema import BINARY_FEATURES, FEATURE_UNITS, PHYSIOLOGICAL_BOUNDS

GREEDY_DISAGREEMENT = 0.5  # |greedy - policy| beyond this (in action units) earns a warning
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a state value beyond this becomes inf inside the model

# Plain decimal or scientific notation only: float() would also take '1_2', 'nan', 'inf', 'infinity'
# and non-ASCII digits, none of which a clinician means when typing a lab value.
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class StateError(ValueError):
    """A patient state that is missing a feature, names an unknown one, has a non-numeric value or one
    outside its physiological range, or on which the model's output is not finite."""


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

    def to_dict(self) -> dict:
        return asdict(self)


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


def recommend(model: TrainedIQL, state: Mapping[str, object], allow_out_of_range: bool = False) -> Recommendation:
    """The policy's action, the critic's view and the caveats for one state; refuses states outside
    the physiological ranges (unless `allow_out_of_range`, then recorded in `overrides`) and
    non-finite model outputs."""
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
    return Recommendation(
        state=values,
        policy_action=policy,
        greedy_action=float(grid[best]),
        q_value=q_value,
        greedy_q_value=float(curve[best]),
        q_curve=[(float(a), float(q)) for a, q in zip(grid, curve)],
        warnings=warnings,
        overrides=out_of_bounds(values),
    )
