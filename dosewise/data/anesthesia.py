"""Reads intraoperative anesthesia series (one row per case per sample) into a
regular per-case grid of decision steps, refusing bad input loudly: every problem
is an error that points at the exact line, or a counted, reported change (a
reordered row, a rounded rate, a carried-forward value, a dropped case)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dosewise.data.loading import DataError, _RawTable, _read

# Canonical column names of a loaded frame.
CASE_ID = "case_id"
TIME = "time"
# Observed vital signs: BIS (0..100), mean/systolic/diastolic arterial pressure (mmHg), heart rate (bpm).
VITALS: tuple[str, ...] = ("BIS", "MAP", "SBP", "DBP", "HR")
# Infusion rates in mL/h: propofol 20 mg/mL and remifentanil 20 µg/mL; whole numbers 0..RATE_MAX.
RATES: tuple[str, ...] = ("PPF20_RATE", "RFTN20_RATE")
TRACKS: tuple[str, ...] = VITALS + RATES
# Per-case patient covariates: years, 1 = male / 0 = female, cm, kg, ASA physical status.
COVARIATES: tuple[str, ...] = ("age", "sex", "height", "weight", "asa")
CANONICAL_COLUMNS: tuple[str, ...] = (CASE_ID, TIME, *TRACKS, *COVARIATES)

# Largest infusion rate level: the planner has RATE_MAX + 1 action levels per drug.
RATE_MAX = 200
# Text values accepted in the sex column (VitalDB's clinical table writes M/F).
SEX_CODES = {"M": "1", "F": "0"}
SEX_EXPECTED = "1 (male) or 0 (female), or M/F"

# Slack (in steps) when assigning a time to its step, so a time a rounding error below a step
# boundary (119.99999999999999 s with 60 s steps) still opens the new step.
_BIN_TOLERANCE = 1e-9


class AnesthesiaDataConfig(BaseModel):
    """Where each canonical column lives in the file, and how samples become decision steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # File column identifying the surgical case; each case becomes one episode.
    case_id: str = "case_id"
    # File column with the sample time in seconds (numeric); orders a case's rows.
    time: str = "time"
    # Canonical track (BIS, MAP, SBP, DBP, HR, PPF20_RATE, RFTN20_RATE) -> file column; all seven required.
    tracks: dict[str, str] = Field(default_factory=lambda: {name: name for name in TRACKS})
    # Canonical covariate (age, sex, height, weight, asa) -> file column; all five required.
    covariates: dict[str, str] = Field(default_factory=lambda: {name: name for name in COVARIATES})
    # Decision step in seconds; finer samples are binned to it (vitals: last non-missing value, rates: last record).
    step_s: float = 60.0
    # Longest run of steps without a vital sign that is filled by carrying the last value forward;
    # a longer run drops the case. Raise to keep more cases, lower to trust fewer stale values.
    max_gap_steps: int = 5

    @model_validator(mode="after")
    def _check_consistent(self) -> AnesthesiaDataConfig:
        for role, mapping, names in (("tracks", self.tracks, TRACKS), ("covariates", self.covariates, COVARIATES)):
            absent = [name for name in names if name not in mapping]
            unknown = [name for name in mapping if name not in names]
            if absent or unknown:
                raise ValueError(
                    f"{role} must map exactly {', '.join(names)} to file columns; missing: {absent or 'none'}, unknown: {unknown or 'none'}"
                )
        if not self.step_s > 0:
            raise ValueError(f"step_s must be positive, got {self.step_s}")
        if self.max_gap_steps < 0:
            raise ValueError(f"max_gap_steps must be >= 0, got {self.max_gap_steps}")
        columns = self.file_columns()
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise ValueError(f"each column may play only one role; used more than once: {repeated}")
        return self

    def file_columns(self) -> list[str]:
        """The file columns read, in canonical order."""
        return [
            self.case_id,
            self.time,
            *(self.tracks[name] for name in TRACKS),
            *(self.covariates[name] for name in COVARIATES),
        ]


# The simulated dataset's layout: every column under its canonical name.
CANONICAL = AnesthesiaDataConfig()

# Track names of a VitalDB export (Solar8000 monitor, Orchestra pumps); `caseid` and the
# clinical covariates as in VitalDB's case table, `Time` as in its track export.
VITALDB = AnesthesiaDataConfig(
    case_id="caseid",
    time="Time",
    tracks={
        "BIS": "BIS/BIS",
        "MAP": "Solar8000/ART_MBP",
        "SBP": "Solar8000/ART_SBP",
        "DBP": "Solar8000/ART_DBP",
        "HR": "Solar8000/HR",
        "PPF20_RATE": "Orchestra/PPF20_RATE",
        "RFTN20_RATE": "Orchestra/RFTN20_RATE",
    },
)


@dataclass(frozen=True)
class CaseReport:
    """What was read, changed and dropped, so the user can check it before training."""

    path: str
    # Data rows in the file.
    rows_total: int
    # Decision steps returned (rows of the loaded frame).
    rows_after_resampling: int
    # Cases returned.
    cases: int
    # Case id -> why the whole case was dropped.
    cases_dropped: dict[str, str]
    # Track -> steps whose value was carried forward from an earlier step (no sample in the step).
    values_carried_forward: dict[str, int]
    # Rows that were out of time order within their case and were moved.
    rows_reordered: int
    # Rate track -> file values that were not whole numbers and were rounded (halves up).
    rates_rounded: dict[str, int]
    # Steps cut at a case's start (before every track was recorded) or end (after a vital stopped).
    steps_trimmed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_total": int(self.rows_total),
            "rows_after_resampling": int(self.rows_after_resampling),
            "cases": int(self.cases),
            "cases_dropped": dict(self.cases_dropped),
            "values_carried_forward": {name: int(count) for name, count in self.values_carried_forward.items()},
            "rows_reordered": int(self.rows_reordered),
            "rates_rounded": {name: int(count) for name, count in self.rates_rounded.items()},
            "steps_trimmed": int(self.steps_trimmed),
        }


@dataclass(frozen=True)
class AnesthesiaReward:
    """Per-step reward of an intraoperative state, from the BIS and MAP reached.

    r = in_target_bonus · 1[bis_low ≤ BIS ≤ bis_high]
        − bis_weight · dist(BIS, [bis_low, bis_high]) / bis_scale
        − hypotension_penalty · 1[MAP < map_low]
        − map_weight · max(0, map_low − MAP) / map_scale

    With the defaults, hypotension is the worst outcome: any MAP below 65 mmHg costs at least
    2, as much as losing the in-target bonus and missing the BIS window by 20 points, and the
    cost keeps growing with the depth of hypotension (MAP < 65 mmHg is associated with
    myocardial and kidney injury, Salmasi 2017). Hypertension is not penalised.
    """

    # Reward for a BIS inside the target window (adequate hypnosis).
    in_target_bonus: float = 1.0
    # Lower end of the BIS target window; deeper is over-sedation.
    bis_low: float = 40.0
    # Upper end of the BIS target window; lighter risks awareness.
    bis_high: float = 60.0
    # Penalty per bis_scale BIS points outside the window.
    bis_weight: float = 0.5
    # BIS points per unit of bis_weight.
    bis_scale: float = 10.0
    # MAP (mmHg) below which the state is hypotensive.
    map_low: float = 65.0
    # Flat penalty for any hypotensive step.
    hypotension_penalty: float = 2.0
    # Additional penalty per map_scale mmHg below map_low.
    map_weight: float = 0.5
    # mmHg per unit of map_weight.
    map_scale: float = 10.0

    def reward(self, bis: Any, map: Any) -> np.ndarray:
        """Elementwise reward (float64) for broadcastable BIS and MAP arrays."""
        bis = np.asarray(bis, dtype=np.float64)
        mean_pressure = np.asarray(map, dtype=np.float64)
        in_window = (bis >= self.bis_low) & (bis <= self.bis_high)
        bis_distance = np.maximum(0.0, np.maximum(self.bis_low - bis, bis - self.bis_high))
        hypotensive = mean_pressure < self.map_low
        map_shortfall = np.maximum(0.0, self.map_low - mean_pressure)
        return (
            self.in_target_bonus * in_window
            - self.bis_weight * bis_distance / self.bis_scale
            - self.hypotension_penalty * hypotensive
            - self.map_weight * map_shortfall / self.map_scale
        )


def load_cases(path: str | Path, config: AnesthesiaDataConfig) -> tuple[pd.DataFrame, CaseReport]:
    """Read, validate and resample a .csv or .parquet file of intraoperative series.

    Returns one row per case per decision step (`config.step_s`), sorted by (case_id, time),
    with the canonical columns `CANONICAL_COLUMNS`: case_id (str), time (s, float64; a case's
    steps lie on the grid first sample time + k·step_s, consecutive, without holes), the vitals (float64),
    the rates (int64, 0..RATE_MAX) and the covariates (float64, constant within a case).

    Per case and step, a vital takes the last non-missing sample of the step and a rate the
    last recorded setting (a pump holds its rate until it is changed, so a step without a rate
    record keeps the previous one). A vital missing for up to `max_gap_steps` consecutive steps
    is carried forward; a longer run drops the case. Steps before every track has been recorded
    once, or after the first vital to stop, are trimmed. All of it is counted in the report.
    Raises DataError for anything that cannot be trusted.
    """
    raw = _read(Path(path))
    _require_columns(raw, config)
    if len(raw.frame) == 0:
        raise DataError(f"{raw.path}: no data rows: the file has a header but no data rows")

    case_labels = raw.frame[config.case_id]
    numbers = _parse_numbers(raw, config, case_labels)
    _require_case_and_time(raw, config, case_labels, numbers[TIME])
    cases = case_labels.astype(str).to_numpy(dtype=object)
    _check_sex_codes(raw, config, cases, numbers["sex"])
    _check_rate_bounds(raw, config, cases, numbers)
    _check_unique_times(raw, config, cases, numbers[TIME])
    _check_constant_covariates(raw, config, cases, numbers)

    # Sort by (case, time); count the rows whose place within their case changed.
    rows = pd.DataFrame({"case": cases, "time": numbers[TIME], "row": np.arange(len(cases))})
    by_time = rows.sort_values(["case", "time"], kind="stable")["row"].to_numpy()
    by_file = rows.sort_values(["case", "row"], kind="stable")["row"].to_numpy()
    rows_reordered = int((by_time != by_file).sum())
    order = by_time

    rates_rounded = {}
    for name in RATES:
        values = numbers[name]
        rounded = np.floor(values + 0.5)  # NaN stays NaN
        rates_rounded[name] = int((rounded != values)[~np.isnan(values)].sum())
        numbers[name] = rounded

    case_codes, case_names = pd.factorize(cases[order], sort=True)
    grid = _resample(
        case_codes,
        numbers[TIME][order],
        np.column_stack([numbers[name][order] for name in TRACKS]),
        len(case_names),
        config,
    )
    covariates = (
        pd.DataFrame({name: numbers[name][order] for name in COVARIATES})
        .groupby(case_codes, sort=True)
        .first()  # the first non-missing value; they all agree (checked above)
        .reindex(range(len(case_names)))
        .to_numpy(np.float64)
    )

    reasons = _drop_reasons(grid, covariates, case_names, config)
    kept_case = np.ones(len(case_names), dtype=bool)
    kept_case[list(reasons)] = False
    keep = grid.in_span & kept_case[grid.case]
    if not keep.any():
        listed = "; ".join(f"case '{case_names[code]}': {reason}" for code, reason in list(reasons.items())[:5])
        more = f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""
        raise DataError(f"{raw.path}: no usable case: all {len(case_names)} cases were dropped: {listed}{more}")

    filled = grid.values[np.maximum(grid.last_observed, 0), np.arange(len(TRACKS))]
    carried = keep[:, None] & ~grid.observed
    case_of_step = grid.case[keep]
    frame = pd.DataFrame(
        {
            CASE_ID: np.asarray(case_names, dtype=object)[case_of_step],
            TIME: grid.times[keep],
            **{name: filled[keep, j] for j, name in enumerate(VITALS)},
            **{name: filled[keep, len(VITALS) + j].astype(np.int64) for j, name in enumerate(RATES)},
            **{name: covariates[case_of_step, j] for j, name in enumerate(COVARIATES)},
        }
    )
    report = CaseReport(
        path=raw.path,
        rows_total=len(raw.frame),
        rows_after_resampling=len(frame),
        cases=int(kept_case.sum()),
        cases_dropped={str(case_names[code]): reason for code, reason in sorted(reasons.items())},
        values_carried_forward={name: int(carried[:, j].sum()) for j, name in enumerate(TRACKS)},
        rows_reordered=rows_reordered,
        rates_rounded=rates_rounded,
        steps_trimmed=int((~grid.in_span & kept_case[grid.case]).sum()),
    )
    return frame, report


@dataclass(frozen=True, eq=False)
class _Grid:
    """Every case on its regular step grid, before carrying forward and trimming."""

    case: np.ndarray  # [G] int64, case code, cases contiguous and in order
    times: np.ndarray  # [G] float64, step time (case start + k·step_s)
    values: np.ndarray  # [G, len(TRACKS)] float64, NaN where the step has no sample
    observed: np.ndarray  # [G, len(TRACKS)] bool
    last_observed: np.ndarray  # [G, len(TRACKS)] int64, last step <= this one with a sample; -1 if none in the case
    next_observed: np.ndarray  # [G, len(TRACKS)] int64, first step >= this one with a sample; G if none in the case
    first_observed: np.ndarray  # [C, len(TRACKS)] int64, first step of the case with a sample; G if none
    in_span: np.ndarray  # [G] bool, after every track has been recorded and before any vital stops


def _resample(case_codes: np.ndarray, times: np.ndarray, values: np.ndarray, n_cases: int, config: AnesthesiaDataConfig) -> _Grid:
    """Bin rows sorted by (case, time) into decision steps; returns the full grid of every case."""
    first_row = np.flatnonzero(np.r_[True, case_codes[1:] != case_codes[:-1]])
    case_t0 = times[first_row]
    step = np.floor((times - case_t0[case_codes]) / config.step_s + _BIN_TOLERANCE).astype(np.int64)
    # Last non-missing value per (case, step), per track (groupby.last skips NaN).
    binned = pd.DataFrame(values).groupby([case_codes, step], sort=True).last()
    bin_case = binned.index.get_level_values(0).to_numpy(np.int64)
    bin_step = binned.index.get_level_values(1).to_numpy(np.int64)

    steps_per_case = np.zeros(n_cases, dtype=np.int64)
    np.maximum.at(steps_per_case, bin_case, bin_step + 1)
    case_start = np.r_[0, np.cumsum(steps_per_case)[:-1]]
    n_steps = int(steps_per_case.sum())
    case = np.repeat(np.arange(n_cases), steps_per_case)
    position = np.arange(n_steps)
    grid_values = np.full((n_steps, len(TRACKS)), np.nan)
    grid_values[case_start[bin_case] + bin_step] = binned.to_numpy(np.float64)
    grid_times = case_t0[case] + (position - case_start[case]) * config.step_s

    observed = ~np.isnan(grid_values)
    column = position[:, None]
    last_observed = np.maximum.accumulate(np.where(observed, column, -1), axis=0)
    last_observed = np.where(last_observed >= case_start[case][:, None], last_observed, -1)
    next_observed = np.minimum.accumulate(np.where(observed, column, n_steps)[::-1], axis=0)[::-1]
    case_end = case_start + steps_per_case
    next_observed = np.where(next_observed < case_end[case][:, None], next_observed, n_steps)

    first_observed = np.minimum.reduceat(np.where(observed, column, n_steps), case_start, axis=0)
    last_in_case = np.maximum.reduceat(np.where(observed, column, -1), case_start, axis=0)
    span_start = first_observed.max(axis=1)
    span_end = last_in_case[:, : len(VITALS)].min(axis=1)
    in_span = (position >= span_start[case]) & (position <= span_end[case])
    return _Grid(case, grid_times, grid_values, observed, last_observed, next_observed, first_observed, in_span)


def _drop_reasons(grid: _Grid, covariates: np.ndarray, case_names: pd.Index, config: AnesthesiaDataConfig) -> dict[int, str]:
    """Case code -> the first reason the case cannot be used."""
    reasons: dict[int, str] = {}
    n_steps = len(grid.case)
    for code in range(len(case_names)):
        for j, name in enumerate(COVARIATES):
            if np.isnan(covariates[code, j]):
                reasons[code] = f"covariate {_label(name, config.covariates[name])} has no value"
                break
        if code in reasons:
            continue
        never = np.flatnonzero(grid.first_observed[code] == n_steps)
        if never.size:
            name = TRACKS[never[0]]
            reasons[code] = f"track {_label(name, config.tracks[name])} has no value"

    # Cases whose tracks never overlap: every track recorded only after some vital stopped.
    has_span = np.zeros(len(case_names), dtype=bool)
    np.logical_or.at(has_span, grid.case, grid.in_span)
    for code in np.flatnonzero(~has_span):
        reasons.setdefault(int(code), "no step in which all tracks have been recorded and no vital has stopped")

    # A vital missing longer than max_gap_steps inside the span; report the first such run.
    stale = np.arange(n_steps)[:, None] - grid.last_observed
    too_stale = grid.in_span[:, None] & (stale > config.max_gap_steps)
    too_stale[:, len(VITALS) :] = False  # a pump keeps its rate: no limit for rates
    step_index, track_index = np.nonzero(too_stale)  # row-major: earliest step, then track order
    if step_index.size:
        cases_hit, first = np.unique(grid.case[step_index], return_index=True)
        for code, at in zip(cases_hit, first):
            step, j = step_index[at], track_index[at]
            run_start = grid.last_observed[step, j] + 1
            run_length = grid.next_observed[step, j] - run_start
            name = TRACKS[j]
            reasons.setdefault(
                int(code),
                f"{_label(name, config.tracks[name])} missing for {run_length} consecutive steps from time "
                f"{grid.times[run_start]:g} s; at most max_gap_steps={config.max_gap_steps} are carried forward",
            )
    return reasons


def _label(canonical: str, column: str) -> str:
    return f"'{column}'" if canonical == column else f"'{column}' ({canonical})"


def _case_label(cases: Any, index: int) -> str:
    case = cases.iloc[index] if isinstance(cases, pd.Series) else cases[index]
    return "case id missing" if pd.isna(case) else f"case '{case}'"


def _require_columns(raw: _RawTable, config: AnesthesiaDataConfig) -> None:
    required = config.file_columns()
    absent = [name for name in required if name not in raw.frame.columns]
    if absent:
        noun = "column" if len(absent) == 1 else "columns"
        raise DataError(
            f"{raw.path}: missing {noun} {', '.join(repr(name) for name in absent)}; "
            f"expected columns: {', '.join(required)}; "
            f"found: {', '.join(map(str, raw.frame.columns))}"
        )


def _parse_numbers(raw: _RawTable, config: AnesthesiaDataConfig, cases: pd.Series) -> dict[str, np.ndarray]:
    """Canonical name -> float64 values, NaN where the cell is empty; any other non-number is an error."""
    columns = {TIME: config.time, **config.tracks, **config.covariates}
    numbers: dict[str, np.ndarray] = {}
    first_bad: list[tuple[int, int, str, str]] = []  # (row index, column order, canonical, file column)
    bad_total = 0
    for order, (name, column_name) in enumerate(columns.items()):
        column = raw.frame[column_name]
        text = pd.api.types.is_string_dtype(column) or column.dtype == object
        if name == "sex" and text:
            upper = column.astype("string").str.upper()
            for code, number in SEX_CODES.items():
                column = column.mask((upper == code).fillna(False).to_numpy(dtype=bool), number)
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        missing = column.isna().to_numpy()
        if not text:
            missing = missing | np.isnan(values)  # a NaN stored in a numeric Parquet column is missing too
        bad = np.flatnonzero(~missing & ~np.isfinite(values))
        if bad.size:
            first_bad.append((int(bad[0]), order, name, column_name))
            bad_total += bad.size
        values[missing] = np.nan
        numbers[name] = values
    if first_bad:
        index, _, name, column_name = min(first_bad)
        others = f" ({bad_total - 1} more invalid values in this file)" if bad_total > 1 else ""
        expected = SEX_EXPECTED if name == "sex" else "a finite number"
        raise DataError(
            f"{raw.where(index)} ({_case_label(cases, index)}): column {_label(name, column_name)} has value "
            f"'{raw.frame[column_name].iloc[index]}'; expected {expected}{others}"
        )
    return numbers


def _require_case_and_time(raw: _RawTable, config: AnesthesiaDataConfig, cases: pd.Series, times: np.ndarray) -> None:
    for column_name, missing in ((config.case_id, cases.isna().to_numpy()), (config.time, np.isnan(times))):
        empty = np.flatnonzero(missing)
        if empty.size:
            others = f" ({empty.size - 1} more rows lack it)" if empty.size > 1 else ""
            raise DataError(
                f"{raw.where(empty[0])} ({_case_label(cases, empty[0])}): column '{column_name}' is empty; "
                f"every row needs a case id and a time{others}"
            )


def _check_sex_codes(raw: _RawTable, config: AnesthesiaDataConfig, cases: np.ndarray, sex: np.ndarray) -> None:
    wrong = np.flatnonzero(~np.isnan(sex) & (sex != 0) & (sex != 1))
    if wrong.size:
        index = wrong[0]
        column_name = config.covariates["sex"]
        raise DataError(
            f"{raw.where(index)} ({_case_label(cases, index)}): column {_label('sex', column_name)} has value "
            f"'{raw.frame[column_name].iloc[index]}'; expected {SEX_EXPECTED}"
        )


def _check_rate_bounds(raw: _RawTable, config: AnesthesiaDataConfig, cases: np.ndarray, numbers: dict[str, np.ndarray]) -> None:
    outside = {name: np.flatnonzero((numbers[name] < 0) | (numbers[name] > RATE_MAX)) for name in RATES}
    total = sum(found.size for found in outside.values())
    if total:
        index, name = min((int(found[0]), name) for name, found in outside.items() if found.size)
        column_name = config.tracks[name]
        others = f" ({total - 1} more rate values are out of range)" if total > 1 else ""
        raise DataError(
            f"{raw.where(index)} ({_case_label(cases, index)}): column {_label(name, column_name)} has value "
            f"'{raw.frame[column_name].iloc[index]}' outside the rate levels 0..{RATE_MAX} mL/h{others}"
        )


def _check_unique_times(raw: _RawTable, config: AnesthesiaDataConfig, cases: np.ndarray, times: np.ndarray) -> None:
    keys = pd.DataFrame({"case": cases, "time": times})
    repeated = np.flatnonzero(keys.duplicated(["case", "time"], keep=False).to_numpy())
    if repeated.size:
        first = repeated[0]
        partner = repeated[(cases[repeated] == cases[first]) & (times[repeated] == times[first])][1]
        raise DataError(
            f"{raw.path} {raw.unit}s {raw.positions[first]} and {raw.positions[partner]} "
            f"({_case_label(cases, first)}): both have {config.time} {raw.frame[config.time].iloc[first]}; "
            "each (case, time) pair must appear only once"
        )


def _check_constant_covariates(raw: _RawTable, config: AnesthesiaDataConfig, cases: np.ndarray, numbers: dict[str, np.ndarray]) -> None:
    conflicts = []  # (row index, covariate, row index of the case's first value)
    for name in COVARIATES:
        values = numbers[name]
        present = np.flatnonzero(~np.isnan(values))
        if not present.size:
            continue
        rows = pd.DataFrame({"case": cases[present], "value": values[present], "row": present})
        first = rows.groupby("case", sort=False).transform("first")
        differs = np.flatnonzero(rows["value"].to_numpy() != first["value"].to_numpy())
        if differs.size:
            conflicts.append((int(present[differs[0]]), name, int(first["row"].iloc[differs[0]])))
    if conflicts:
        index, name, partner = min(conflicts)
        column_name = config.covariates[name]
        raise DataError(
            f"{raw.path} {raw.unit}s {raw.positions[partner]} and {raw.positions[index]} "
            f"({_case_label(cases, index)}): column {_label(name, column_name)} has "
            f"'{raw.frame[column_name].iloc[partner]}' and '{raw.frame[column_name].iloc[index]}'; "
            "covariates must be constant within a case"
        )
