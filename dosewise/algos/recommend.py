"""Decision support for one patient: what the policy suggests, what the critic prefers, and caveats.

The policy mean is the recommendation: it stays close to what clinicians did in similar states.
The greedy action (argmax of the Q-curve) is shown for insight, with a warning when it leaves
the clinicians' range, because a critic is least reliable exactly where the data is thin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dosewise.algos.trained import TrainedIQL

GREEDY_DISAGREEMENT = 0.5  # |greedy - policy| beyond this (in action units) earns a warning


class StateError(ValueError):
    """A patient state that is missing a feature, names an unknown one, or has a non-numeric value."""


@dataclass(frozen=True)
class Recommendation:
    state: dict[str, float]
    policy_action: float  # mean of the learned policy: the recommendation
    greedy_action: float  # argmax of Q over the action grid
    q_value: float  # Q(state, policy_action)
    greedy_q_value: float  # Q(state, greedy_action)
    q_curve: list[tuple[float, float]]  # (action, Q) over the grid
    warnings: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def parse_state(pairs: Sequence[str], feature_names: Sequence[str]) -> dict[str, float]:
    """``["vanco_level=25", ...]`` -> {name: value}, every feature exactly once."""
    state: dict[str, float] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep:
            raise StateError(f"--state {pair!r}: expected name=value, e.g. vanco_level=18.5")
        if name in state:
            raise StateError(f"--state {name}: given twice")
        state[name] = _number(name, text.strip())
    return validate_state(state, feature_names)


def _number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StateError(f"feature {name!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise StateError(f"feature {name!r}: {value!r} is not a finite number")
    return number


def validate_state(state: Mapping[str, object], feature_names: Sequence[str]) -> dict[str, float]:
    unknown = [k for k in state if k not in feature_names]
    if unknown:
        raise StateError(f"unknown feature(s) {', '.join(map(repr, unknown))}; the model uses: {', '.join(feature_names)}")
    missing = [k for k in feature_names if k not in state]
    if missing:
        raise StateError(f"missing feature(s) {', '.join(map(repr, missing))}; the model needs all of: {', '.join(feature_names)}")
    return {k: _number(k, state[k]) for k in feature_names}


def recommend(model: TrainedIQL, state: Mapping[str, object]) -> Recommendation:
    values = validate_state(state, model.feature_names)
    obs = np.array([[values[k] for k in model.feature_names]], dtype=np.float32)
    grid = model.action_grid()
    curve = model.q_curve(obs, grid)[0]
    policy = float(model.policy_action(obs)[0])
    best = int(curve.argmax())
    warnings = [
        f"{name} = {values[name]:g} is outside the training range [{lo:g}, {hi:g}]: the model extrapolates"
        for name, (lo, hi) in model.feature_ranges.items()
        if not lo <= float(np.float32(values[name])) <= hi  # ranges were taken from the float32 training tensors
    ]
    if abs(float(grid[best]) - policy) > GREEDY_DISAGREEMENT:
        warnings.append(
            f"greedy action {grid[best]:+.2f} is far from the policy's {policy:+.2f}: the Q-curve peaks where the "
            "clinicians' data is thin; prefer policy_action"
        )
    return Recommendation(
        state=values,
        policy_action=policy,
        greedy_action=float(grid[best]),
        q_value=float(model.q_value(obs, np.array([policy]))[0]),
        greedy_q_value=float(curve[best]),
        q_curve=[(float(a), float(q)) for a, q in zip(grid, curve)],
        warnings=warnings,
    )
