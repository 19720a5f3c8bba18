"""Reads a clinical dosing table and refuses bad input loudly: a policy learned
from silently mangled data is worse than none, so every problem is either an
error that points at the exact line or a counted, reported row drop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dosewise.data.schema import BINARY_FEATURES, LINE_COLUMN, RECORD_COLUMNS, DataConfig

ACCEPTED_SUFFIXES = (".csv", ".parquet")

# Target trough window for vancomycin, mg/L (used by the computed reward).
TARGET_LEVEL_LOW = 10.0
TARGET_LEVEL_HIGH = 20.0

# Largest magnitude a number may have: the model trains in float32, where anything larger is inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class DataError(ValueError):
    """Bad input data; the message is the complete text shown to the user."""


@dataclass(frozen=True)
class DataReport:
    """What was read, dropped and kept, so the user can check it before training."""

    path: str
    rows_total: int
    rows_dropped_nan: int
    dropped_nan_by_column: dict[str, int]
    rows_valid: int
    patients: int
    transitions: int
    feature_ranges: dict[str, tuple[float, float]]
    action_range: tuple[float, float]
    reward_source: str
    # Lines with every cell empty; skipped, so rows_valid + rows_dropped_nan + rows_blank = data rows in the file.
    rows_blank: int = 0
    # The optional state columns (DataConfig.optional_features) the file has, in state order.
    optional_features: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_total": int(self.rows_total),
            "rows_dropped_nan": int(self.rows_dropped_nan),
            "dropped_nan_by_column": {name: int(count) for name, count in self.dropped_nan_by_column.items()},
            "rows_valid": int(self.rows_valid),
            "patients": int(self.patients),
            "transitions": int(self.transitions),
            "feature_ranges": {name: {"min": float(low), "max": float(high)} for name, (low, high) in self.feature_ranges.items()},
            "action_range": {"min": float(self.action_range[0]), "max": float(self.action_range[1])},
            "reward_source": self.reward_source,
            "rows_blank": int(self.rows_blank),
            "optional_features": list(self.optional_features),
        }


@dataclass(frozen=True)
class _RawTable:
    """The file as read: cells untouched except blanks turned into NA."""

    path: str
    frame: pd.DataFrame
    # Where each row sits in the file: CSV line number or 1-based Parquet row number.
    positions: np.ndarray
    # "line" for CSV, "row" for Parquet.
    unit: str
    # Rows with every cell empty, removed from `frame` (blank CSV lines).
    blank_rows: int = 0

    def where(self, index: int) -> str:
        return f"{self.path} {self.unit} {self.positions[index]}"


def load_table(path: str | Path, config: DataConfig) -> tuple[pd.DataFrame, DataReport]:
    """Read, validate and clean a .csv or .parquet dosing table.

    Returns the valid rows sorted by (patient, time) with columns patient_id (str),
    time, the state features (`features`, then the optional features the file has),
    action, reward (all float64) and `line` (source line/row number), named as in
    `config`, plus a report of what was read and dropped.
    Raises DataError for anything that cannot be trusted.
    """
    return _load_raw(read_table(Path(path)), config)


def load_rows(rows: pd.DataFrame, config: DataConfig, source: str = "rows") -> tuple[pd.DataFrame, DataReport]:
    """`load_table` for rows already in memory (a request's JSON rows): the same checks, errors naming `source` and the row."""
    return _load_raw(rows_table(rows, source), config)


def _load_raw(raw: _RawTable, config: DataConfig) -> tuple[pd.DataFrame, DataReport]:
    _require_columns(raw, config)
    has_reward_column = config.reward in raw.frame.columns
    if not has_reward_column:
        _require_reward_features(raw, config)
    state = config.state_features(raw.frame.columns)

    numeric_columns = [config.time, *state, config.action]
    if has_reward_column:
        numeric_columns.append(config.reward)
    numbers, missing = _parse_numbers(raw, config, numeric_columns)
    carried = [name for name in RECORD_COLUMNS if name in raw.frame.columns and name not in numeric_columns]
    record_numbers, record_missing = _parse_numbers(raw, config, carried)
    if "sex" in carried:
        sex, unknown = record_numbers["sex"], record_missing["sex"]
        odd = np.flatnonzero(~unknown & (sex != 0.0) & (sex != 1.0))
        _refuse_rows(raw, config, "sex", odd, "; expected 1 (male) or 0 (female)", "have other values")
    patient_ids = raw.frame[config.patient_id]
    missing = {config.patient_id: patient_ids.isna().to_numpy(), **missing}

    _check_action_bounds(raw, config, numbers[config.action], missing[config.action])
    for name in state:
        if name in BINARY_FEATURES:
            _check_binary(raw, config, name, numbers[name], missing[name])
    _check_unique_times(raw, config, numbers[config.time], missing[config.patient_id] | missing[config.time])

    rows_total = len(raw.frame)
    row_missing = np.logical_or.reduce(list(missing.values()))
    dropped_by_column = {name: int(mask.sum()) for name, mask in missing.items() if mask.any()}
    if row_missing.all():
        raise DataError(_no_valid_rows_message(raw.path, rows_total, dropped_by_column))

    keep = ~row_missing
    reward = numbers[config.reward] if has_reward_column else np.full(rows_total, np.nan)
    frame = pd.DataFrame(
        {
            config.patient_id: patient_ids[keep].astype(str).to_numpy(),
            **{name: numbers[name][keep] for name in (config.time, *state, config.action)},
            config.reward: reward[keep],
            **{name: record_numbers[name][keep] for name in carried},
            LINE_COLUMN: raw.positions[keep],
        }
    )
    frame = frame.sort_values([config.patient_id, config.time], kind="stable").reset_index(drop=True)
    if not has_reward_column:
        frame[config.reward] = observed_reward(frame, config)

    report = DataReport(
        path=raw.path,
        rows_total=rows_total,
        rows_dropped_nan=int(row_missing.sum()),
        dropped_nan_by_column=dropped_by_column,
        rows_valid=len(frame),
        patients=int(frame[config.patient_id].nunique()),
        transitions=len(frame),
        feature_ranges={name: (float(frame[name].min()), float(frame[name].max())) for name in state},
        action_range=(float(frame[config.action].min()), float(frame[config.action].max())),
        reward_source="column" if has_reward_column else "computed",
        rows_blank=raw.blank_rows,
        optional_features=state[len(config.features) :],
    )
    return frame, report


def observed_reward(frame: pd.DataFrame, config: DataConfig) -> np.ndarray:
    """Trough-based stand-in reward for data without a reward column.

    Per row: +1 when the drug level is inside the 10–20 mg/L target window,
    -(10 - level)/10 below it and -(level - 20)/20 above it; minus
    2 * max(0, creatinine / baseline - 1), where the baseline is the patient's
    first (earliest) creatinine, so a rise in creatinine (kidney injury) costs
    reward while a fall is not rewarded.
    """
    level = frame[config.level_feature].to_numpy(np.float64)
    creatinine = frame[config.creatinine_feature].to_numpy(np.float64)
    earliest_first = frame.sort_values([config.patient_id, config.time], kind="stable")
    first_creatinine = earliest_first.groupby(config.patient_id, sort=False)[config.creatinine_feature].first()
    baseline = frame[config.patient_id].map(first_creatinine).to_numpy(np.float64)
    not_positive = np.flatnonzero(~(baseline > 0))
    if not_positive.size:
        patient = frame[config.patient_id].iloc[not_positive[0]]
        raise DataError(
            f"patient '{patient}': first creatinine is {baseline[not_positive[0]]}; the computed reward "
            f"divides by it, so it must be positive (or add a '{config.reward}' column)"
        )

    level_term = np.where(
        level < TARGET_LEVEL_LOW,
        -(TARGET_LEVEL_LOW - level) / TARGET_LEVEL_LOW,
        np.where(level > TARGET_LEVEL_HIGH, -(level - TARGET_LEVEL_HIGH) / TARGET_LEVEL_HIGH, 1.0),
    )
    kidney_penalty = 2.0 * np.maximum(0.0, creatinine / baseline - 1.0)
    return level_term - kidney_penalty


def read_table(path: Path) -> _RawTable:
    suffix = path.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type; expected a {' or '.join(ACCEPTED_SUFFIXES)} file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return _read_csv(path) if suffix == ".csv" else _read_parquet(path)


def rows_table(frame: pd.DataFrame, source: str) -> _RawTable:
    """Rows already in memory (a request's JSON rows) read as a Parquet file is: numbered from 1,
    errors naming `source`."""
    return _RawTable(source, _blanks_to_na(frame.reset_index(drop=True), source), np.arange(1, len(frame) + 1), "row")


def _read_csv(path: Path) -> _RawTable:
    # Everything as text, so an empty cell (missing) stays distinguishable from 'abc' (an error).
    # Blank lines are kept while reading so that row positions map onto file lines.
    try:
        frame = pd.read_csv(path, dtype=str, skip_blank_lines=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a header line with column names") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as CSV: {err}") from None
    frame = _blanks_to_na(frame, str(path))
    positions = np.arange(2, len(frame) + 2)  # the header is line 1
    blank_line = frame.isna().all(axis=1).to_numpy()
    return _RawTable(str(path), frame[~blank_line].reset_index(drop=True), positions[~blank_line], "line", int(blank_line.sum()))


def _read_parquet(path: Path) -> _RawTable:
    try:
        frame = pd.read_parquet(path, dtype_backend="numpy_nullable")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as Parquet: {err}") from None
    # A frame saved with a named index keeps its columns (e.g. patient_id) there.
    named_index = any(name is not None for name in frame.index.names)
    frame = frame.reset_index(drop=not named_index)
    return _RawTable(str(path), _blanks_to_na(frame, str(path)), np.arange(1, len(frame) + 1), "row")


def _blanks_to_na(frame: pd.DataFrame, path: str) -> pd.DataFrame:
    frame = frame.rename(columns=lambda name: str(name).strip())
    repeated = sorted(set(frame.columns[frame.columns.duplicated()]))
    if repeated:
        raise DataError(f"{path}: column name(s) {', '.join(map(repr, repeated))} given more than once (spaces around names are ignored)")
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_string_dtype(column) or column.dtype == object:
            text = column.astype("string").str.strip()
            frame[name] = text.mask(text == "")
    return frame


def _require_columns(raw: _RawTable, config: DataConfig) -> None:
    required = [config.patient_id, config.time, *config.features, config.action]
    absent = [name for name in required if name not in raw.frame.columns]
    if absent:
        noun = "column" if len(absent) == 1 else "columns"
        raise DataError(
            f"{raw.path}: missing {noun} {', '.join(repr(name) for name in absent)}; "
            f"expected columns: {', '.join(required)} (optional: {', '.join([config.reward, *config.optional_state])}); "
            f"found: {', '.join(map(str, raw.frame.columns))}"
        )


def _require_reward_features(raw: _RawTable, config: DataConfig) -> None:
    needed = [name for name in (config.level_feature, config.creatinine_feature) if name not in config.features]
    if needed:
        raise DataError(
            f"{raw.path}: there is no '{config.reward}' column, and computing the reward needs the "
            f"features {config.level_feature!r} and {config.creatinine_feature!r}, but "
            f"{', '.join(repr(name) for name in needed)} is not among the configured features"
        )


def _patient_label(raw: _RawTable, config: DataConfig, index: int) -> str:
    patient = raw.frame[config.patient_id].iloc[index]
    return "patient id missing" if pd.isna(patient) else f"patient '{patient}'"


def _parse_numbers(raw: _RawTable, config: DataConfig, columns: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Convert columns to float64 with their missing-cell masks; any other non-finite value, or one too large
    for float32, is an error."""
    numbers: dict[str, np.ndarray] = {}
    missing: dict[str, np.ndarray] = {}
    first_bad: list[tuple[int, int, str]] = []  # (row index, column order, column name)
    bad_total = 0
    for order, name in enumerate(columns):
        column = raw.frame[name]
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        is_missing = column.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(column):
            is_missing = is_missing | np.isnan(values)  # a NaN stored in a numeric Parquet column is missing too
        # A value float32 cannot hold would become inf in the training tensors, so it is refused here too.
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~is_missing & ~(np.abs(values) <= FLOAT32_MAX))
        if bad.size:
            first_bad.append((int(bad[0]), order, name))
            bad_total += bad.size
        numbers[name] = values
        missing[name] = is_missing
    if first_bad:
        index, _, name = min(first_bad)
        others = f" ({bad_total - 1} more invalid values in this file)" if bad_total > 1 else ""
        too_large = f" of magnitude at most {FLOAT32_MAX:.4g} (32-bit floats)" if np.isfinite(numbers[name][index]) else ""
        raise DataError(
            f"{raw.where(index)} ({_patient_label(raw, config, index)}): column '{name}' has value "
            f"'{raw.frame[name].iloc[index]}'; expected a finite number{too_large}{others}"
        )
    return numbers, missing


def _check_action_bounds(raw: _RawTable, config: DataConfig, actions: np.ndarray, missing: np.ndarray) -> None:
    outside = np.flatnonzero(~missing & ((actions < config.action_low) | (actions > config.action_high)))
    _refuse_rows(
        raw,
        config,
        config.action,
        outside,
        f" outside the declared bounds [{config.action_low}, {config.action_high}]",
        "are out of bounds",
        "; rescale the actions or set action_low/action_high in the data config",
    )


def _check_binary(raw: _RawTable, config: DataConfig, name: str, values: np.ndarray, missing: np.ndarray) -> None:
    _refuse_rows(
        raw, config, name, np.flatnonzero(~missing & (values != 0.0) & (values != 1.0)), "; expected 0 (no) or 1 (yes)", "have other values"
    )


def _refuse_rows(raw: _RawTable, config: DataConfig, column: str, rows: np.ndarray, expected: str, others: str, hint: str = "") -> None:
    """A DataError naming the first of `rows` (file, line, patient, value) and counting the others."""
    if rows.size:
        index = rows[0]
        more = f" ({rows.size - 1} more rows {others})" if rows.size > 1 else ""
        raise DataError(
            f"{raw.where(index)} ({_patient_label(raw, config, index)}): column '{column}' has value "
            f"'{raw.frame[column].iloc[index]}'{expected}{more}{hint}"
        )


def _check_unique_times(raw: _RawTable, config: DataConfig, times: np.ndarray, missing: np.ndarray) -> None:
    present = ~missing
    keys = pd.DataFrame(
        {
            "patient": raw.frame[config.patient_id].to_numpy()[present],
            "time": times[present],
            "position": raw.positions[present],
        }
    )
    repeated = keys[keys.duplicated(["patient", "time"], keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        partner = repeated[(repeated["patient"] == first["patient"]) & (repeated["time"] == first["time"])].iloc[1]
        raise DataError(
            f"{raw.path} {raw.unit}s {first['position']} and {partner['position']} (patient '{first['patient']}'): "
            f"both have {config.time} {first['time']}; each (patient, time) pair must appear only once"
        )


def _no_valid_rows_message(path: str, rows_total: int, dropped_by_column: dict[str, int]) -> str:
    if rows_total == 0:
        return f"{path}: no valid rows: the file has a header but no data rows"
    by_column = ", ".join(f"{name}: {count}" for name, count in dropped_by_column.items())
    return f"{path}: no valid rows: all {rows_total} rows have a missing value in a used column (rows missing each column: {by_column})"
