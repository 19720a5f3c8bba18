"""The vancomycin loader on corrupted copies of a simulated cohort: numbers the model cannot hold are
errors that point at the cell, and every row of a file that loads is accounted for."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dosewise import api
from dosewise.data import DataConfig, DataError, load_table

CONFIG = DataConfig()
NUMERIC = [CONFIG.time, *CONFIG.features, CONFIG.action, CONFIG.reward]
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Four simulated patients (62 rows, one creatinine missing), as the text cells a CSV holds."""
    path = tmp_path_factory.mktemp("cohort") / "vanco.csv"
    api.simulate_vancomycin(path, patients=4, seed=11)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_a_value_float32_cannot_hold_is_an_error_naming_file_line_patient_and_column(cohort: pd.DataFrame, tmp_path: Path) -> None:
    """1e39 is finite in float64 but inf in the float32 training tensors, so it is refused like inf."""
    patient = cohort.loc[3, "patient_id"]
    for text in ["1e39", "-1e39", "3.5e38", "1e400", "inf", "-inf", "Infinity"]:
        frame = cohort.copy()
        frame.loc[3, "creatinine"] = text
        path = _csv(frame, tmp_path / "vanco.csv")
        with pytest.raises(DataError) as err:
            load_table(path, CONFIG)
        message = str(err.value)
        assert message.startswith(f"{path} line 5 (patient '{patient}'): column 'creatinine' has value '{text}'; expected a finite number")
        assert ("32-bit" in message) == bool(np.isfinite(float(text))), text
    frame = cohort.copy()
    frame.loc[0, "wbc"] = "3.4e38"  # the largest float32 still loads
    loaded, _ = load_table(_csv(frame, tmp_path / "vanco.csv"), CONFIG)
    assert loaded["wbc"].max() == 3.4e38


def test_non_finite_and_huge_numbers_in_a_numeric_parquet_column_are_errors(cohort: pd.DataFrame, tmp_path: Path) -> None:
    frame = cohort.copy()
    frame[NUMERIC] = frame[NUMERIC].replace("", np.nan).astype(float)  # the simulated labs have gaps
    for value, row in ((np.inf, 2), (-1e39, 6)):
        broken = frame.copy()
        broken.loc[row, "sbp"] = value
        path = tmp_path / "vanco.parquet"
        broken.to_parquet(path)
        with pytest.raises(
            DataError, match=rf"^{re.escape(str(path))} row {row + 1} \(patient '{broken.loc[row, 'patient_id']}'\): column 'sbp' has value"
        ):
            load_table(path, CONFIG)


def test_blank_rows_are_counted_so_every_row_is_accounted_for(cohort: pd.DataFrame, tmp_path: Path) -> None:
    path = _csv(cohort, tmp_path / "vanco.csv")
    lines = path.read_text().splitlines()
    lines[3:3] = ["", "," * (len(cohort.columns) - 1)]
    path.write_text("\n".join(lines) + "\n")
    frame, report = load_table(path, CONFIG)
    assert (report.rows_blank, report.rows_dropped_nan, report.dropped_nan_by_column) == (2, 1, {"creatinine": 1})
    assert report.rows_valid == len(frame) == len(cohort) - 1
    assert report.rows_valid + report.rows_dropped_nan + report.rows_blank == len(lines) - 1  # every line after the header
    assert report.to_dict()["rows_blank"] == 2


# -- random corruption --------------------------------------------------------------------------

CELL_TEXT = st.sampled_from(
    ["", " ", "abc", "1_2", "0x10", "nan", "NA", "inf", "-inf", "Infinity", "1e39", "-1e39", "1e308", "1e400", "12 3", "--1"]
)
OPERATION = st.one_of(
    st.tuples(st.just("cell"), st.integers(0, 10_000), st.sampled_from(["patient_id", *NUMERIC]), CELL_TEXT),
    st.tuples(st.just("blank_row"), st.integers(0, 10_000)),
    st.tuples(st.just("duplicate"), st.integers(0, 10_000)),
    st.tuples(st.just("shuffle"), st.integers(0, 2**31)),
)  # fmt: skip


def _corrupt(frame: pd.DataFrame, operations: list[tuple]) -> pd.DataFrame:
    frame = frame.copy()
    for op in operations:
        if op[0] == "cell":
            frame.iloc[op[1] % len(frame), frame.columns.get_loc(op[2])] = op[3]
        elif op[0] == "blank_row":
            frame.iloc[op[1] % len(frame)] = ""
        elif op[0] == "duplicate":
            frame = pd.concat([frame, frame.iloc[[op[1] % len(frame)]]], ignore_index=True)
        else:
            frame = frame.sample(frac=1.0, random_state=op[1] % 2**32).reset_index(drop=True)
    return frame


def _as_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Numeric columns as floats where every cell is a number (blank -> NaN), text otherwise."""
    frame = frame.copy()
    for name in NUMERIC:
        numbers = pd.to_numeric(frame[name].replace("", np.nan), errors="coerce")
        if numbers.notna().sum() == (frame[name] != "").sum():
            frame[name] = numbers
    frame.to_parquet(path)
    return path


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(OPERATION, max_size=6), parquet=st.booleans())
def test_a_corrupted_cohort_loads_with_every_row_counted_or_is_a_data_error(
    cohort: pd.DataFrame, tmp_path: Path, operations: list[tuple], parquet: bool
) -> None:
    frame = _corrupt(cohort, operations)
    path = _as_parquet(frame, tmp_path / "vanco.parquet") if parquet else _csv(frame, tmp_path / "vanco.csv")
    try:
        loaded, report = load_table(path, CONFIG)
    except DataError as err:
        assert str(err).startswith(str(path))
        event("refused")
        return
    event("loaded with drops" if report.rows_dropped_nan else "loaded")
    assert report.rows_valid + report.rows_dropped_nan + report.rows_blank == len(frame)
    assert report.rows_valid == len(loaded) and report.rows_total == len(frame) - report.rows_blank
    assert all(0 < count <= report.rows_dropped_nan for count in report.dropped_nan_by_column.values())
    assert sum(report.dropped_nan_by_column.values()) >= report.rows_dropped_nan
    values = loaded[NUMERIC].to_numpy(np.float64)
    assert np.isfinite(values).all() and (np.abs(values) <= FLOAT32_MAX).all()
    assert loaded["line"].is_unique
