"""Cuts loaded anesthesia cases into the fixed-size training windows of the
planner: a left-padded history up to decision step t, and the true actions,
vitals, rewards and return that follow it. Also splits data by case, never by
window, so no patient leaks between training and evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import overload

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

from dosewise.data.anesthesia import (
    CANONICAL_COLUMNS,
    CASE_ID,
    COVARIATES,
    RATE_MAX,
    RATES,
    TIME,
    VITALS,
    AnesthesiaReward,
)
from dosewise.sim.anesthesia import Covariates
from dosewise.sim.anesthesia.cases import PUMP_CONCENTRATIONS, pump_concentrations

# Per-step observation in the history: the vitals at the step, the rates set one step before, and
# the option flag (1 in the induction phase, the first `WindowConfig.induction_s` of the case).
HISTORY_FEATURES: tuple[str, ...] = (*VITALS, *(f"prev_{name}" for name in RATES), "option")
# Largest class of the categorical BIS target (classes 0..BIS_MAX).
BIS_MAX = 100
# Largest class of the categorical MAP target, mmHg (classes 0..MAP_MAX).
MAP_MAX = 200
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# The planner's reward (BIS window, hypotension worst); inject another to compare.
DEFAULT_REWARD = AnesthesiaReward()

# Steps per block of the discounted-return computation (a [block, block] matrix per product).
_RETURN_BLOCK = 256


class WindowConfig(BaseModel):
    """Shape of the training windows and of the case split."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # History steps the representation sees (the current step included); longer = more context, more memory.
    max_len: int = 64
    # Future steps unrolled by the dynamics (actions, targets, rewards).
    pre_len: int = 5
    # Discount of the per-window return; lower = more short-sighted value targets.
    gamma: float = 0.99
    # The option flag of each history step is 1 during the first `induction_s` seconds of a case
    # (induction: bolus and loss of consciousness) and 0 in maintenance; 0 turns it off.
    induction_s: float = 600.0
    # Append to every history step the population-PK plasma and effect-site concentrations of both
    # drugs from all rates since the case start (what a TCI pump displays): the history then carries
    # infusions older than max_len, and the dose-response the model must learn is closer to linear.
    concentrations: bool = False
    # Share of cases in (train, val, test); must sum to 1.
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # Seed of the case split; the same seed and case ids always give the same split.
    seed: int = 0

    @model_validator(mode="after")
    def _check_consistent(self) -> WindowConfig:
        if self.max_len < 1 or self.pre_len < 1:
            raise ValueError(f"max_len and pre_len must be >= 1, got {self.max_len} and {self.pre_len}")
        if self.induction_s < 0.0:
            raise ValueError(f"induction_s must be >= 0, got {self.induction_s}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if any(not share >= 0.0 for share in self.split) or abs(sum(self.split) - 1.0) > 1e-9:
            raise ValueError(f"split must be three non-negative shares summing to 1, got {self.split}")
        return self


@dataclass(frozen=True, eq=False)
class Windows:
    """One window per (case, decision step t) with at least one later step in the case.

    Row w looks at step t of case case_ids[w]: history holds steps t-max_len+1..t (real steps
    right-aligned, zero padding on the left), actions the rates set at t..t+pre_len-1, and the
    targets and rewards the outcomes at t+1..t+pre_len; future_mask is False past the case end,
    where actions, targets and rewards are 0.
    """

    history: np.ndarray  # [W, max_len, F] float32; F = len(feature_names); zeros where not history_mask
    history_mask: np.ndarray  # [W, max_len] bool; True = a real step of the case
    static: np.ndarray  # [W, S] float32; S = len(static_names)
    actions: np.ndarray  # [W, pre_len, 2] int64; rate levels 0..RATE_MAX at t+k, order action_names
    target_bis: np.ndarray  # [W, pre_len] int64; BIS at t+k+1, rounded, clipped to 0..BIS_MAX
    target_map: np.ndarray  # [W, pre_len] int64; MAP at t+k+1, rounded, clipped to 0..MAP_MAX
    rewards: np.ndarray  # [W, pre_len] float32; reward of reaching step t+k+1
    returns: np.ndarray  # [W] float32; sum over s >= t of gamma^(s-t) * reward of reaching s+1, to the case end
    future_mask: np.ndarray  # [W, pre_len] bool; True where step t+k+1 exists in the case
    case_ids: np.ndarray  # [W] object (str)
    times: np.ndarray  # [W] float64; time of step t, s
    feature_names: tuple[str, ...] = HISTORY_FEATURES
    static_names: tuple[str, ...] = COVARIATES
    action_names: tuple[str, ...] = RATES

    def __len__(self) -> int:
        return len(self.case_ids)

    def select(self, index: np.ndarray | slice) -> Windows:
        """The windows at `index` (boolean mask, integer positions or slice), all arrays alike."""
        arrays = {
            field.name: getattr(self, field.name)[index]
            for field in dataclasses.fields(self)
            if isinstance(getattr(self, field.name), np.ndarray)
        }
        return dataclasses.replace(self, **arrays)


def build_windows(
    frame: pd.DataFrame,
    window_config: WindowConfig,
    reward: AnesthesiaReward = DEFAULT_REWARD,
) -> Windows:
    """Windows for every decision step of every case in a frame from `load_cases`.

    A case of T steps gives T-1 windows (t = 0..T-2); its first window has exactly one real
    history step. The reward of step s is `reward.reward(BIS, MAP)` at step s+1. Built with
    array indexing over all cases at once (the returns loop over blocks of each case).
    """
    steps = _case_steps(frame, window_config)
    frame, case_end, vitals, rates = steps.frame, steps.case_end, steps.vitals, steps.rates
    position = np.arange(len(frame))

    # step_reward[s]: reward of reaching step s+1 (0 on a case's last step, which has no successor).
    has_next = position + 1 < case_end
    following = np.where(has_next, position + 1, position)
    step_reward = np.where(has_next, reward.reward(vitals[following, 0], vitals[following, 1]), 0.0)
    step_return = np.zeros(len(frame))
    for start, end in zip(steps.starts, steps.ends):
        step_return[start:end] = discounted_suffix_sums(step_reward[start:end], window_config.gamma)

    origin = np.flatnonzero(has_next)  # [W] step t of each window
    history, history_mask = steps.history_at(origin, window_config.max_len)

    action_index = origin[:, None] + np.arange(window_config.pre_len)  # [W, pre_len] steps t..t+pre_len-1
    future_mask = action_index + 1 < case_end[origin][:, None]
    acted = np.where(future_mask, action_index, 0)
    reached = np.where(future_mask, action_index + 1, 0)
    return Windows(
        history=history,
        history_mask=history_mask,
        static=steps.static[origin],
        actions=np.where(future_mask[..., None], rates[acted], 0).astype(np.int64),
        target_bis=np.where(future_mask, _round_clip(vitals[reached, 0], BIS_MAX), 0),
        target_map=np.where(future_mask, _round_clip(vitals[reached, 1], MAP_MAX), 0),
        rewards=np.where(future_mask, step_reward[acted], 0.0).astype(np.float32),
        returns=step_return[origin].astype(np.float32),
        future_mask=future_mask,
        case_ids=steps.cases[origin],
        times=frame[TIME].to_numpy(np.float64)[origin],
        feature_names=history_features(window_config),
    )


@dataclass(frozen=True, eq=False)
class DecisionInputs:
    """The model's input at the last step of every case of a frame (one row per case, sorted by
    case id), laid out as `build_windows` lays out a training window at that step."""

    history: np.ndarray  # [C, max_len, F] float32, real steps right-aligned, zeros before the case
    history_mask: np.ndarray  # [C, max_len] bool
    static: np.ndarray  # [C, S] float32
    case_ids: np.ndarray  # [C] object (str)
    times: np.ndarray  # [C] float64, time of the last step, s
    steps: np.ndarray  # [C] int64, steps of the case (the last one included)
    feature_names: tuple[str, ...] = HISTORY_FEATURES


def decision_inputs(frame: pd.DataFrame, window_config: WindowConfig) -> DecisionInputs:
    """What the model reads when it decides at the last step of each case: the history of a
    training window whose step t is that last step (which `build_windows` never makes, as no
    later step exists to learn from). One code path with `build_windows`, so a recommendation
    sees exactly what training saw."""
    steps = _case_steps(frame, window_config)
    origin = steps.ends - 1
    history, history_mask = steps.history_at(origin, window_config.max_len)
    return DecisionInputs(
        history=history,
        history_mask=history_mask,
        static=steps.static[origin],
        case_ids=steps.cases[origin],
        times=steps.frame[TIME].to_numpy(np.float64)[origin],
        steps=(steps.ends - steps.starts).astype(np.int64),
        feature_names=history_features(window_config),
    )


@dataclass(frozen=True, eq=False)
class _CaseSteps:
    """A loaded frame sorted by (case, time), with every step's history features."""

    frame: pd.DataFrame
    cases: np.ndarray  # [N] object (str)
    starts: np.ndarray  # [C] first step of each case
    ends: np.ndarray  # [C] one past its last step
    case_start: np.ndarray  # [N] first step of the step's case
    case_end: np.ndarray  # [N] one past the last step of the step's case
    vitals: np.ndarray  # [N, 5] float64
    rates: np.ndarray  # [N, 2] int64
    observations: np.ndarray  # [N, F] float32: vitals, rates set one step before, option flag (and concentrations)
    static: np.ndarray  # [N, S] float32

    def history_at(self, origin: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """History [W, max_len, F] float32 and mask [W, max_len] of windows whose step t is `origin`."""
        history_index = origin[:, None] + np.arange(-max_len + 1, 1)  # [W, max_len]
        history_mask = history_index >= self.case_start[origin][:, None]
        picked = self.observations[np.where(history_mask, history_index, 0)]
        return np.where(history_mask[..., None], picked, np.float32(0)).astype(np.float32), history_mask


def _case_steps(frame: pd.DataFrame, window_config: WindowConfig) -> _CaseSteps:
    _check_frame(frame)
    frame = frame.sort_values([CASE_ID, TIME], kind="stable").reset_index(drop=True)
    n_steps = len(frame)
    cases = frame[CASE_ID].astype(str).to_numpy(dtype=object)
    first_of_case = np.r_[True, cases[1:] != cases[:-1]] if n_steps else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(first_of_case)
    ends = np.r_[starts[1:], n_steps]
    case_index = np.cumsum(first_of_case) - 1
    case_start = starts[case_index]  # [N]
    case_end = ends[case_index]  # [N], exclusive

    vitals = frame[list(VITALS)].to_numpy(np.float64)  # [N, 5]
    rates = frame[list(RATES)].to_numpy(np.int64)  # [N, 2]
    previous_rates = np.zeros_like(rates)
    previous_rates[1:] = rates[:-1]
    previous_rates[first_of_case] = 0  # nothing was infused before the case started
    elapsed = frame[TIME].to_numpy(np.float64) - frame[TIME].to_numpy(np.float64)[case_start]  # [N] s
    option = (elapsed < window_config.induction_s)[:, None]  # [N, 1] the option flag: induction phase
    parts = [vitals, previous_rates, option]
    if window_config.concentrations:
        parts.append(_case_concentrations(frame, starts, ends, rates))
    observations = np.concatenate(parts, axis=1).astype(np.float32)  # [N, F]
    static = frame[list(COVARIATES)].to_numpy(np.float32)
    return _CaseSteps(frame, cases, starts, ends, case_start, case_end, vitals, rates, observations, static)


def history_features(config: WindowConfig) -> tuple[str, ...]:
    """Names of the per-step history features the windows of `config` carry."""
    return HISTORY_FEATURES + (PUMP_CONCENTRATIONS if config.concentrations else ())


def _case_concentrations(frame: pd.DataFrame, starts: np.ndarray, ends: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """`pump_concentrations` at every step of every case of a sorted frame: [N, 4], row s the
    state after the case's rates before step s (all cases at once, padded to the longest)."""
    lengths = ends - starts
    longest = int(lengths.max()) if len(starts) else 0
    time = frame[TIME].to_numpy(np.float64)
    # One decision step (build_windows checked they are equal); a frame of one-step cases has no
    # gap, and needs none: its only step comes before any infusion.
    multi = starts[lengths > 1]
    step_s = float(time[multi[0] + 1] - time[multi[0]]) if multi.size else 60.0
    within = np.arange(longest)[None, :] < lengths[:, None]  # [C, T]
    index = np.where(within, starts[:, None] + np.arange(longest)[None, :], 0)
    padded = np.where(within[..., None], rates[index], 0)  # [C, T, 2]
    first = frame.iloc[starts]
    covariates = Covariates.from_arrays(
        first["age"].to_numpy(np.float64),
        first["height"].to_numpy(np.float64),
        first["weight"].to_numpy(np.float64),
        first["sex"].to_numpy(np.float64),
    )
    conc = pump_concentrations(covariates, padded, step_s)[:, :-1]  # [C, T, 4] state before step s's rates
    out = np.zeros((len(frame), len(PUMP_CONCENTRATIONS)))
    out[index[within]] = conc[within]
    return out


def discounted_suffix_sums(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G[t] = sum over s >= t of gamma^(s-t) · rewards[s], float64, for a 1-D array.

    Computed backwards in blocks: within a block by one matrix product, across blocks by
    carrying G at the next block's first step; stable for any gamma in [0, 1] and any length.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(rewards)
    block = min(_RETURN_BLOCK, max(len(rewards), 1))
    lag = np.arange(block)[None, :] - np.arange(block)[:, None]
    discount = np.where(lag >= 0, np.power(gamma, np.maximum(lag, 0)), 0.0)  # [block, block] upper triangular
    carry = 0.0
    for stop in range(len(rewards), 0, -block):
        start = max(0, stop - block)
        size = stop - start
        to_next_block = np.power(gamma, size - np.arange(size))
        out[start:stop] = discount[:size, :size] @ rewards[start:stop] + to_next_block * carry
        carry = out[start]
    return out


def split_case_ids(case_ids: np.ndarray | list[str], config: WindowConfig) -> dict[str, np.ndarray]:
    """Assign each distinct case id to train/val/test: a seeded permutation of the sorted ids,
    cut into parts of sizes proportional to `config.split` (largest remainder; while there are
    enough cases, every part with a positive share gets at least one). Values: sorted ids (str).
    """
    ids = np.unique(np.asarray(case_ids).astype(str)).astype(object)
    shuffled = ids[np.random.default_rng(config.seed).permutation(len(ids))]
    bounds = np.r_[0, np.cumsum(_part_sizes(len(ids), config.split))]
    return {name: np.sort(shuffled[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SPLIT_NAMES)}


@overload
def split_by_case(data: Windows, config: WindowConfig) -> dict[str, Windows]: ...


@overload
def split_by_case(data: pd.DataFrame, config: WindowConfig) -> dict[str, pd.DataFrame]: ...


def split_by_case(data: Windows | pd.DataFrame, config: WindowConfig) -> dict[str, Windows] | dict[str, pd.DataFrame]:
    """Split windows, or a loaded frame, into train/val/test by case (`split_case_ids`).

    The split depends on the set of case ids: a case with a single step has no window, so to
    split a frame and its windows alike, split the frame and build windows per part (or pass
    the frame's ids to `split_case_ids` and select).
    """
    ids = data.case_ids if isinstance(data, Windows) else data[CASE_ID].astype(str).to_numpy(dtype=object)
    parts = split_case_ids(ids, config)
    if isinstance(data, Windows):
        return {name: data.select(np.isin(ids, members)) for name, members in parts.items()}
    return {name: data[np.isin(ids, members)].reset_index(drop=True) for name, members in parts.items()}


def _part_sizes(n: int, shares: tuple[float, ...]) -> np.ndarray:
    exact = n * np.asarray(shares, dtype=np.float64)
    sizes = np.floor(exact + 1e-9).astype(np.int64)
    leftover = n - int(sizes.sum())
    if leftover > 0:
        sizes[np.argsort(-(exact - sizes), kind="stable")[:leftover]] += 1
    wanted = np.asarray(shares) > 0
    if n >= wanted.sum():
        for part in np.flatnonzero(wanted & (sizes == 0)):
            sizes[np.argmax(sizes)] -= 1
            sizes[part] += 1
    return sizes


def _round_clip(values: np.ndarray, high: int) -> np.ndarray:
    """Nearest integer (halves up), clipped to 0..high, int64."""
    return np.clip(np.floor(values + 0.5), 0, high).astype(np.int64)


def _check_frame(frame: pd.DataFrame) -> None:
    absent = [name for name in CANONICAL_COLUMNS if name not in frame.columns]
    if absent:
        raise ValueError(f"build_windows needs a frame from load_cases; missing columns {absent}, found {list(frame.columns)}")
    numeric = frame[[*VITALS, *RATES, *COVARIATES, TIME]]
    if numeric.isna().to_numpy().any():
        columns = [name for name in numeric.columns if numeric[name].isna().any()]
        raise ValueError(f"build_windows: missing values in columns {columns}; load the file with load_cases")
    rates = frame[list(RATES)].to_numpy(np.float64)
    if ((rates != np.round(rates)) | (rates < 0) | (rates > RATE_MAX)).any():
        raise ValueError(f"build_windows: rates must be whole numbers in 0..{RATE_MAX}")
    ordered = frame.sort_values([CASE_ID, TIME], kind="stable")
    same_case = ordered[CASE_ID].to_numpy()[1:] == ordered[CASE_ID].to_numpy()[:-1]
    gaps = np.diff(ordered[TIME].to_numpy(np.float64))[same_case]
    if (gaps.size and not np.allclose(gaps, gaps[0], rtol=1e-9, atol=1e-9)) or (gaps <= 0).any():
        raise ValueError(
            "build_windows: consecutive steps of a case must be one decision step apart "
            f"(found time steps from {gaps.min():g} to {gaps.max():g} s); load the file with load_cases"
        )
