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

from dosewise.data.loading import DataError, _RawTable, read_table, rows_table

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

# Physiological bounds of the vitals, (low, high]: a value at or below low or above high cannot come
# from a living patient under anesthesia and is an artefact (BIS 0: electrode off or signal lost;
# a pressure of 0: a closed transducer; 300 mmHg: an arterial-line flush). Such values are masked
# as missing, counted, and then follow the gap rules. Configurable per vital (`vital_bounds`).
VITAL_BOUNDS: dict[str, tuple[float, float]] = {
    "BIS": (0.0, 100.0),
    "MAP": (0.0, 250.0),
    "SBP": (0.0, 250.0),
    "DBP": (0.0, 250.0),
    "HR": (0.0, 250.0),
}
# Largest magnitude a value may have: the windows hold float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)

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
    # Vital (BIS, MAP, SBP, DBP, HR) -> (low, high): values <= low or > high are masked as missing
    # artefacts and counted; all five required, finite, low < high. Defaults: VITAL_BOUNDS.
    vital_bounds: dict[str, tuple[float, float]] = Field(default_factory=lambda: dict(VITAL_BOUNDS))
    # Longest time between consecutive samples of a case, in seconds; a longer jump (typically one
    # time in another unit, e.g. epoch milliseconds among seconds) drops the case with its lines named.
    # Together with step_s it bounds the resampled grid: at most max_time_gap_s / step_s steps per row.
    max_time_gap_s: float = 3600.0
    # Longest case, first to last sample, in seconds; a longer case is dropped with its reason.
    max_case_duration_s: float = 86400.0

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """`data: vitaldb` in a config is `data: {preset: vitaldb}`: the preset's fields (`DATA_PRESETS`),
        then the other keys given next to `preset` on top (`{preset: vitaldb, step_s: 30}`); a mapping
        given for tracks, covariates or vital_bounds replaces the preset's entries it names only."""
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict) or "preset" not in data:
            return data
        overrides = dict(data)
        name = overrides.pop("preset")
        if not isinstance(name, str) or name not in DATA_PRESETS:
            raise ValueError(f"unknown data preset {name!r}; expected one of: {', '.join(DATA_PRESETS)}")
        fields = DATA_PRESETS[name].model_dump()
        for key, value in overrides.items():
            merge = key in ("tracks", "covariates", "vital_bounds") and isinstance(value, dict)
            fields[key] = {**fields[key], **value} if merge else value
        return fields

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
        if set(self.vital_bounds) != set(VITALS):
            absent = [name for name in VITALS if name not in self.vital_bounds]
            unknown = [name for name in self.vital_bounds if name not in VITALS]
            raise ValueError(
                f"vital_bounds must give (low, high) for exactly {', '.join(VITALS)}; missing: {absent or 'none'}, unknown: {unknown or 'none'}"
            )
        for name, (low, high) in self.vital_bounds.items():
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise ValueError(f"vital_bounds.{name} must be finite (low, high) with low < high, got ({low}, {high})")
        if not self.step_s <= self.max_time_gap_s <= self.max_case_duration_s:
            raise ValueError(
                f"need step_s <= max_time_gap_s <= max_case_duration_s, got {self.step_s}, {self.max_time_gap_s}, {self.max_case_duration_s}"
            )
        if self.max_case_duration_s / self.step_s > 1e7:
            raise ValueError(
                f"max_case_duration_s / step_s must be at most 1e7 steps per case, got {self.max_case_duration_s / self.step_s:g}"
            )
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
# The column layouts of anesthesia files, by name: `data: vitaldb` (or `{preset: vitaldb, ...}`) in a
# planner config, `--data-preset` on the command line.
DATA_PRESETS: dict[str, AnesthesiaDataConfig] = {"canonical": CANONICAL, "vitaldb": VITALDB}


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
    # Vital -> values outside its `vital_bounds`, masked as missing (then carried forward or dropping the case).
    artefacts_masked: dict[str, int]
    # Case id -> values masked in that case (cases with at least one).
    artefacts_by_case: dict[str, int]
    # Where every data row went; the five add up to rows_total:
    # rows repeating an earlier row in every read column (dropped, the first kept),
    rows_duplicate: int
    # rows of a dropped case,
    rows_in_dropped_cases: int
    # rows of a kept case whose step was trimmed,
    rows_trimmed: int
    # rows of a kept step none of whose values the step took (a later sample of the step replaced them, or all were missing),
    rows_superseded: int
    # rows that gave at least one value to a returned step.
    rows_used: int

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
            "artefacts_masked": {name: int(count) for name, count in self.artefacts_masked.items()},
            "artefacts_by_case": {case: int(count) for case, count in self.artefacts_by_case.items()},
            "rows_duplicate": int(self.rows_duplicate),
            "rows_in_dropped_cases": int(self.rows_in_dropped_cases),
            "rows_trimmed": int(self.rows_trimmed),
            "rows_superseded": int(self.rows_superseded),
            "rows_used": int(self.rows_used),
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
    once, or after the first vital to stop, are trimmed. A vital outside `vital_bounds` is masked
    as missing first; an exact repeat of a row is dropped; a case whose times jump by more than
    `max_time_gap_s` or span more than `max_case_duration_s` is dropped before any step is counted,
    so memory is bounded by the rows. All of it is counted in the report, and every row lands in
    one of rows_used, rows_superseded, rows_trimmed, rows_in_dropped_cases and rows_duplicate.
    Raises DataError for anything that cannot be trusted (a non-number, inf, NaN text or a value
    float32 cannot hold, a rate outside 0..RATE_MAX, conflicting rows, changing covariates).
    """
    return _load_raw(read_table(Path(path)), config)


def load_case_rows(rows: pd.DataFrame, config: AnesthesiaDataConfig, source: str = "request") -> tuple[pd.DataFrame, CaseReport]:
    """`load_cases` for rows already in memory (the service's JSON case history): the same checks,
    repairs and report, errors naming `source` and the 1-based row."""
    return _load_raw(rows_table(rows, source), config)


def _load_raw(raw: _RawTable, config: AnesthesiaDataConfig) -> tuple[pd.DataFrame, CaseReport]:
    _require_columns(raw, config)
    if len(raw.frame) == 0:
        raise DataError(f"{raw.path}: no data rows: the file has a header but no data rows")

    case_labels = raw.frame[config.case_id]
    numbers = _parse_numbers(raw, config, case_labels)
    _require_case_and_time(raw, config, case_labels, numbers[TIME])
    cases = case_labels.astype(str).to_numpy(dtype=object)
    _check_sex_codes(raw, config, cases, numbers["sex"])
    _check_rate_bounds(raw, config, cases, numbers)
    # A row repeating an earlier one in every read column carries no new information: drop it, count it.
    duplicate = pd.DataFrame({"case": cases, **numbers}).duplicated(keep="first").to_numpy()
    _check_unique_times(raw, config, cases, numbers[TIME], duplicate)
    _check_constant_covariates(raw, config, cases, numbers)
    distinct = np.flatnonzero(~duplicate)
    cases, positions = cases[distinct], raw.positions[distinct]
    numbers = {name: values[distinct] for name, values in numbers.items()}
    masked = _mask_artefacts(numbers, config)

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
    times = numbers[TIME][order]
    time_reasons = _time_outliers(case_codes, times, positions[order], raw.unit, config)
    # A dropped case's rows all go into its first step, so an outlying time never sizes the grid.
    first_time = pd.Series(times).groupby(case_codes).transform("first").to_numpy()
    times = np.where(np.isin(case_codes, list(time_reasons)), first_time, times)
    grid = _resample(
        case_codes,
        times,
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

    reasons = dict(time_reasons)
    for code, reason in _drop_reasons(grid, covariates, case_names, config).items():
        reasons.setdefault(code, reason)
    kept_case = np.ones(len(case_names), dtype=bool)
    kept_case[list(reasons)] = False
    keep = grid.in_span & kept_case[grid.case]
    if not keep.any():
        listed = "; ".join(f"case '{case_names[code]}': {reasons[code]}" for code in sorted(reasons)[:5])
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
    masked_by_case = pd.Series(masked.sum(axis=1)).groupby(cases).sum()
    row_kept_case = kept_case[case_codes]
    row_kept_step = keep[grid.row_step]
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
        artefacts_masked={name: int(masked[:, j].sum()) for j, name in enumerate(VITALS)},
        artefacts_by_case={str(case): int(count) for case, count in masked_by_case[masked_by_case > 0].items()},
        rows_duplicate=int(duplicate.sum()),
        rows_in_dropped_cases=int((~row_kept_case).sum()),
        rows_trimmed=int((row_kept_case & ~row_kept_step).sum()),
        rows_superseded=int((row_kept_step & ~grid.row_gives_value).sum()),
        rows_used=int((row_kept_step & grid.row_gives_value).sum()),
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
    row_step: np.ndarray  # [N] int64, the step (index into G) of each input row
    row_gives_value: np.ndarray  # [N] bool, the row holds a value its step takes (the step's last non-missing, per track)


def _resample(case_codes: np.ndarray, times: np.ndarray, values: np.ndarray, n_cases: int, config: AnesthesiaDataConfig) -> _Grid:
    """Bin rows sorted by (case, time) into decision steps; returns the full grid of every case.

    The caller has collapsed cases with an outlying time (`_time_outliers`), so every case spans at
    most max_case_duration_s and each row adds at most max_time_gap_s / step_s steps: the grid is
    bounded by the rows, whatever the times say."""
    first_row = np.flatnonzero(np.r_[True, case_codes[1:] != case_codes[:-1]])
    case_t0 = times[first_row]
    step = np.floor((times - case_t0[case_codes]) / config.step_s + _BIN_TOLERANCE).astype(np.int64)
    # Last non-missing value per (case, step), per track (groupby.last skips NaN), and the row it came from.
    row = np.arange(len(times), dtype=np.float64)[:, None]
    both = pd.DataFrame(np.hstack([values, np.where(np.isnan(values), np.nan, row)])).groupby([case_codes, step], sort=True).last()
    binned = both.iloc[:, : len(TRACKS)]
    giver = both.iloc[:, len(TRACKS) :].to_numpy(np.float64)
    row_gives_value = np.zeros(len(times), dtype=bool)
    row_gives_value[giver[~np.isnan(giver)].astype(np.int64)] = True
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
    row_step = case_start[case_codes] + step
    return _Grid(case, grid_times, grid_values, observed, last_observed, next_observed, first_observed, in_span, row_step, row_gives_value)


def _time_outliers(
    case_codes: np.ndarray, times: np.ndarray, positions: np.ndarray, unit: str, config: AnesthesiaDataConfig
) -> dict[int, str]:
    """Case code -> why its times cannot be trusted: a jump between consecutive samples longer than
    max_time_gap_s (named by its two lines), or a span longer than max_case_duration_s. Checked in
    float64 before any step is counted, so an outlier never sizes an allocation."""
    reasons: dict[int, str] = {}
    gap = np.diff(times)
    same_case = case_codes[1:] == case_codes[:-1]
    for at in np.flatnonzero(same_case & (gap > config.max_time_gap_s)):
        reasons.setdefault(
            int(case_codes[at]),
            f"time jumps from {times[at]:g} s ({unit} {positions[at]}) to {times[at + 1]:g} s ({unit} {positions[at + 1]}), "
            f"more than max_time_gap_s={config.max_time_gap_s:g} s between consecutive samples; is one time in another unit "
            "(e.g. milliseconds)?",
        )
    first_row = np.flatnonzero(np.r_[True, ~same_case])
    last_row = np.r_[first_row[1:] - 1, len(times) - 1]
    for first, last in zip(first_row, last_row):
        span = times[last] - times[first]
        if span > config.max_case_duration_s:
            reasons.setdefault(
                int(case_codes[first]),
                f"the case spans {span:g} s ({unit}s {positions[first]} to {positions[last]}), "
                f"more than max_case_duration_s={config.max_case_duration_s:g} s",
            )
    return reasons


def _mask_artefacts(numbers: dict[str, np.ndarray], config: AnesthesiaDataConfig) -> np.ndarray:
    """Set vitals outside their `vital_bounds` to missing, in place; returns the [rows, vitals] mask of what was set."""
    masked = np.zeros((len(numbers[TIME]), len(VITALS)), dtype=bool)
    for j, name in enumerate(VITALS):
        low, high = config.vital_bounds[name]
        values = numbers[name]
        masked[:, j] = ~np.isnan(values) & ((values <= low) | (values > high))
        numbers[name] = np.where(masked[:, j], np.nan, values)
    return masked


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
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        missing = column.isna().to_numpy()
        if not text:
            missing = missing | np.isnan(values)  # a NaN stored in a numeric Parquet column is missing too
        bad = np.flatnonzero(~missing & ~(np.abs(values) <= FLOAT32_MAX))  # also NaN, inf and what float32 cannot hold
        if bad.size:
            first_bad.append((int(bad[0]), order, name, column_name))
            bad_total += bad.size
        values[missing] = np.nan
        numbers[name] = values
    if first_bad:
        index, _, name, column_name = min(first_bad)
        others = f" ({bad_total - 1} more invalid values in this file)" if bad_total > 1 else ""
        if name == "sex":
            expected = SEX_EXPECTED
        elif np.isfinite(numbers[name][index]):
            expected = f"a number of magnitude at most {FLOAT32_MAX:.6g} (float32)"
        else:
            expected = "a finite number"
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


def _check_unique_times(raw: _RawTable, config: AnesthesiaDataConfig, cases: np.ndarray, times: np.ndarray, duplicate: np.ndarray) -> None:
    """Two distinct rows (not exact repeats, which are dropped) may not share a (case, time)."""
    candidates = np.flatnonzero(~duplicate)
    keys = pd.DataFrame({"case": cases[candidates], "time": times[candidates]})
    repeated = candidates[keys.duplicated(["case", "time"], keep=False).to_numpy()]
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
