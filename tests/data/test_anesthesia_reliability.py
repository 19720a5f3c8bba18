"""Anesthesia input that no patient could have produced must be masked and counted, refused with
its line, or drop its case with a reason, never flow silently into windows; these tests pin each
outcome, the row accounting of the load report, and `dosewise data inspect` on anesthesia files,
on small simulated cohorts corrupted per test."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dosewise.api import inspect_data, simulate_vancomycin
from dosewise.cli import app
from dosewise.config import ConfigError
from dosewise.data import CANONICAL, VITALDB, AnesthesiaDataConfig, DataError, load_cases
from dosewise.data.anesthesia import RATE_MAX, TRACKS, VITAL_BOUNDS, VITALS, CaseReport
from dosewise.data.loading import DataReport
from dosewise.sim.anesthesia.cases import CaseSpec
from dosewise.sim.anesthesia.clinician import simulate_cases

runner = CliRunner()


@functools.cache
def _simulated(n_cases: int, seed: int) -> pd.DataFrame:
    return simulate_cases(n_cases, seed=seed, spec=CaseSpec(duration_min=(20.0, 30.0)))


def cohort(n_cases: int = 3, seed: int = 5) -> pd.DataFrame:
    """Short simulated cases as text cells (one row per case per minute), ready to be spoiled cell by cell."""
    return _simulated(n_cases, seed).astype(str)


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def accounted(report: CaseReport) -> int:
    """Every data row lands in exactly one of these."""
    return report.rows_duplicate + report.rows_in_dropped_cases + report.rows_trimmed + report.rows_superseded + report.rows_used


def row_of(frame: pd.DataFrame, case: str, minute: int) -> int:
    return int(np.flatnonzero((frame["case_id"] == case) & (pd.to_numeric(frame["time"]) == 60 * minute))[0])


# -- impossible vitals -----------------------------------------------------------------------------


def test_impossible_vitals_are_masked_counted_and_carried_forward(tmp_path: Path) -> None:
    rows = cohort()
    clean, _ = load_cases(write_csv(tmp_path / "clean.csv", rows), CANONICAL)
    spoiled = {("1", 5, "BIS"): "0", ("1", 9, "MAP"): "300", ("2", 4, "HR"): "-3", ("2", 6, "SBP"): "0.0", ("3", 7, "DBP"): "251"}
    for (case, minute, column), value in spoiled.items():
        rows.loc[row_of(rows, case, minute), column] = value
    frame, report = load_cases(write_csv(tmp_path / "cases.csv", rows), CANONICAL)

    assert report.artefacts_masked == {"BIS": 1, "MAP": 1, "SBP": 1, "DBP": 1, "HR": 1}
    assert report.artefacts_by_case == {"1": 2, "2": 2, "3": 1}
    assert report.values_carried_forward == {name: int(name in VITALS) for name in TRACKS}
    assert report.cases_dropped == {} and len(frame) == len(clean)
    for case, minute, column in spoiled:
        at = row_of(clean, case, minute)
        assert frame[column].iloc[at] == clean[column].iloc[at - 1]  # the last plausible value, carried forward
    unchanged = [name for name in frame.columns if name not in VITALS]
    pd.testing.assert_frame_equal(frame[unchanged], clean[unchanged])
    assert report.to_dict()["artefacts_masked"] == report.artefacts_masked


def test_a_run_of_artefacts_longer_than_the_gap_limit_drops_the_case(tmp_path: Path) -> None:
    rows = cohort()
    for minute in range(8, 14):  # an arterial-line flush held for six minutes
        rows.loc[row_of(rows, "2", minute), "MAP"] = "300"
    _, report = load_cases(write_csv(tmp_path / "cases.csv", rows), CANONICAL)
    assert report.cases_dropped == {
        "2": "'MAP' missing for 6 consecutive steps from time 480 s; at most max_gap_steps=5 are carried forward"
    }
    assert report.artefacts_masked["MAP"] == 6 and report.artefacts_by_case == {"2": 6}
    assert report.rows_in_dropped_cases == int((rows["case_id"] == "2").sum())
    assert accounted(report) == report.rows_total == len(rows)


def test_vital_bounds_are_configurable_and_validated(tmp_path: Path) -> None:
    rows = cohort()
    rows.loc[row_of(rows, "1", 5), "BIS"] = "0"
    keep_zero = CANONICAL.model_copy(update={"vital_bounds": {**VITAL_BOUNDS, "BIS": (-1.0, 100.0)}})
    frame, report = load_cases(write_csv(tmp_path / "cases.csv", rows), keep_zero)
    assert report.artefacts_masked["BIS"] == 0 and frame["BIS"].iloc[5] == 0.0

    assert AnesthesiaDataConfig().vital_bounds == {
        "BIS": (0.0, 100.0),
        "MAP": (0.0, 250.0),
        "SBP": (0.0, 250.0),
        "DBP": (0.0, 250.0),
        "HR": (0.0, 250.0),
    }
    with pytest.raises(
        pydantic.ValidationError, match=r"vital_bounds.MAP must be finite \(low, high\) with low < high, got \(90.0, 60.0\)"
    ):
        AnesthesiaDataConfig(vital_bounds={**VITAL_BOUNDS, "MAP": (90.0, 60.0)})
    with pytest.raises(pydantic.ValidationError, match=r"vital_bounds.HR must be finite"):
        AnesthesiaDataConfig(vital_bounds={**VITAL_BOUNDS, "HR": (0.0, float("inf"))})
    with pytest.raises(pydantic.ValidationError, match=r"missing: \['HR'\], unknown: \['SpO2'\]"):
        AnesthesiaDataConfig(vital_bounds={**{k: v for k, v in VITAL_BOUNDS.items() if k != "HR"}, "SpO2": (50.0, 100.0)})


# -- timestamps -------------------------------------------------------------------------------------


def test_one_epoch_millisecond_time_drops_its_case_quickly(tmp_path: Path) -> None:
    rows = cohort()
    at = row_of(rows, "2", 7)
    rows.loc[at, "time"] = "1700000000000"  # epoch milliseconds among seconds since the case started
    path = write_csv(tmp_path / "cases.csv", rows)
    started = time.perf_counter()
    frame, report = load_cases(path, CANONICAL)
    assert time.perf_counter() - started < 5.0
    last = int(rows.loc[rows["case_id"] == "2", "time"].astype(float).nlargest(2).iloc[1])
    last_line = int(np.flatnonzero((rows["case_id"] == "2") & (rows["time"] == str(last)))[0]) + 2
    assert report.cases_dropped == {
        "2": f"time jumps from {last} s (line {last_line}) to 1.7e+12 s (line {at + 2}), more than max_time_gap_s=3600 s "
        "between consecutive samples; is one time in another unit (e.g. milliseconds)?"
    }
    assert sorted(frame["case_id"].unique()) == ["1", "3"] and report.cases == 2
    assert report.rows_in_dropped_cases == int((rows["case_id"] == "2").sum())
    assert accounted(report) == len(rows)


def test_a_case_longer_than_the_duration_limit_is_dropped_before_resampling(tmp_path: Path) -> None:
    """Samples 50 minutes apart pass the gap limit, but together they span more than the case may last."""
    rows = cohort()
    case = rows["case_id"] == "3"
    rows.loc[case, "time"] = (np.arange(case.sum()) * 3000.0).astype(str)
    first, last = np.flatnonzero(case)[[0, -1]] + 2
    _, report = load_cases(write_csv(tmp_path / "cases.csv", rows), AnesthesiaDataConfig(max_case_duration_s=36000.0))
    span = (case.sum() - 1) * 3000
    assert span > 36000
    assert report.cases_dropped == {"3": f"the case spans {span} s (lines {first} to {last}), more than max_case_duration_s=36000 s"}

    with pytest.raises(pydantic.ValidationError, match="need step_s <= max_time_gap_s <= max_case_duration_s"):
        AnesthesiaDataConfig(max_time_gap_s=30.0)
    with pytest.raises(pydantic.ValidationError, match="at most 1e7 steps per case"):
        AnesthesiaDataConfig(step_s=0.001, max_time_gap_s=1.0)


# -- non-finite and float32-overflowing numbers -------------------------------------------------------


@pytest.mark.parametrize("column", ["time", "BIS", "PPF20_RATE", "age"])
def test_a_number_float32_cannot_hold_names_line_case_column_and_value(tmp_path: Path, column: str) -> None:
    rows = cohort()
    at = row_of(rows, "2", 3)
    rows.loc[at, column] = "-1e39"
    path = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(DataError) as error:
        load_cases(path, CANONICAL)
    assert str(error.value) == (
        f"{path} line {at + 2} (case '2'): column '{column}' has value '-1e39'; expected a number of magnitude at most 3.40282e+38 (float32)"
    )
    rows.loc[at, column] = "inf"
    with pytest.raises(DataError, match=rf"line {at + 2} \(case '2'\): column '{column}' has value 'inf'; expected a finite number$"):
        load_cases(write_csv(path, rows), CANONICAL)


def test_a_huge_number_in_a_numeric_parquet_column_is_an_error(tmp_path: Path) -> None:
    rows = _simulated(3, 5).rename(columns={"case_id": "caseid", "time": "Time", **VITALDB.tracks})
    rows["Solar8000/ART_MBP"] = rows["Solar8000/ART_MBP"].astype(np.float64)
    rows.loc[4, "Solar8000/ART_MBP"] = 5e38
    path = tmp_path / "cases.parquet"
    rows.to_parquet(path, index=False)
    with pytest.raises(DataError) as error:
        load_cases(path, VITALDB)
    assert str(error.value) == (
        f"{path} row 5 (case '1'): column 'Solar8000/ART_MBP' (MAP) has value '5e+38'; expected a number of magnitude at most 3.40282e+38 (float32)"
    )


# -- duplicates and row accounting --------------------------------------------------------------------


def test_exact_duplicate_rows_are_dropped_and_counted_conflicting_ones_refused(tmp_path: Path) -> None:
    rows = cohort()
    clean, _ = load_cases(write_csv(tmp_path / "clean.csv", rows), CANONICAL)
    doubled = pd.concat([rows, rows.iloc[[3, 40]], rows.iloc[[3]]], ignore_index=True)
    frame, report = load_cases(write_csv(tmp_path / "cases.csv", doubled), CANONICAL)
    pd.testing.assert_frame_equal(frame, clean)
    assert report.rows_duplicate == 3 and report.rows_used == len(rows) and accounted(report) == len(doubled)

    doubled.loc[len(rows), "BIS"] = "12.5"  # the same (case, time) with another value: which one is true?
    path = write_csv(tmp_path / "conflict.csv", doubled)
    with pytest.raises(
        DataError, match=rf"lines 5 and {len(rows) + 2} \(case '1'\): both have time 180; each \(case, time\) pair must appear only once"
    ):
        load_cases(path, CANONICAL)


def test_superseded_and_trimmed_rows_are_counted(tmp_path: Path) -> None:
    """Two samples in one step: the later one gives the values; rows before every track is recorded are trimmed."""
    rows = cohort()
    extra = rows.iloc[[10]].copy()
    extra["time"] = str(float(extra["time"].iloc[0]) - 30.0)  # 30 s earlier, same step, replaced by the on-minute row
    rows.loc[row_of(rows, "3", 0), "RFTN20_RATE"] = ""  # case 3's first minute has no remifentanil record: trimmed
    spoiled = pd.concat([rows, extra], ignore_index=True)
    _, report = load_cases(write_csv(tmp_path / "cases.csv", spoiled), CANONICAL)
    assert (report.rows_superseded, report.rows_trimmed, report.steps_trimmed) == (1, 1, 1)
    assert report.rows_used == len(rows) - 1 and accounted(report) == report.rows_total == len(spoiled)


# -- property: corrupted files fail only with DataError, and every row is accounted for ---------------

BASE = cohort(3, seed=11)
COLUMNS = list(BASE.columns)
NUMERIC_NOISE = ["", "abc", "0", "-5", "300", "1e39", "inf", "nan", "1e30", "-1e30", "1700000000000", "55.5"]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[pd.DataFrame, bool]:
    """The base cohort with a few random corruptions; also whether rows were duplicated."""
    frame = BASE.copy()
    duplicated = False
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["cell", "vital", "duplicate", "sample", "shuffle", "time", "drop"]))
        at = draw(st.integers(0, len(frame) - 1))
        if kind == "cell":
            frame.iloc[at, COLUMNS.index(draw(st.sampled_from(COLUMNS)))] = draw(st.sampled_from(NUMERIC_NOISE))
        elif kind == "vital":
            frame.loc[frame.index[at], draw(st.sampled_from(VITALS))] = draw(st.sampled_from(["0", "-1", "101", "300", "1e30"]))
        elif kind == "duplicate":
            frame = pd.concat([frame, frame.iloc[[at]]], ignore_index=True)
            duplicated = True
        elif kind == "sample":  # one more sample inside a step, seconds after another one
            extra = frame.iloc[[at]].copy()
            extra["time"] = str(pd.to_numeric(extra["time"].iloc[0], errors="coerce") + draw(st.sampled_from([-20.0, 15.0, 45.0])))
            extra["BIS"] = draw(st.sampled_from(["", "47.5", "0"]))
            frame = pd.concat([frame, extra], ignore_index=True)
        elif kind == "shuffle":
            frame = frame.sample(frac=1.0, random_state=draw(st.integers(0, 2**31 - 1))).reset_index(drop=True)
        elif kind == "time":
            value = pd.to_numeric(frame["time"].iloc[at], errors="coerce")
            frame.iloc[at, COLUMNS.index("time")] = str(draw(st.sampled_from([value * 1000.0, value + 1.7e12, -1.7e12])))
        else:
            frame = frame.drop(index=frame.index[at]).reset_index(drop=True)
    return frame, duplicated


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted())
def test_corrupted_files_raise_only_data_error_and_account_for_every_row(tmp_path: Path, case: tuple[pd.DataFrame, bool]) -> None:
    rows, duplicated = case
    path = write_csv(tmp_path / "cases.csv", rows)
    try:
        frame, report = load_cases(path, CANONICAL)
    except DataError:
        return
    # kept + dropped-with-reason = input rows: used + superseded + trimmed + in dropped cases + exact duplicates.
    assert accounted(report) == report.rows_total == len(rows)
    assert len(frame) == report.rows_after_resampling and frame["case_id"].nunique() == report.cases
    assert report.cases + len(report.cases_dropped) == rows["case_id"].nunique()
    assert all(reason for reason in report.cases_dropped.values())
    if not duplicated:
        assert report.rows_duplicate == 0
        assert report.rows_in_dropped_cases == int(rows["case_id"].isin(list(report.cases_dropped)).sum())
    for name in VITALS:
        low, high = CANONICAL.vital_bounds[name]
        assert ((frame[name] > low) & (frame[name] <= high)).all(), name
    assert frame[["PPF20_RATE", "RFTN20_RATE"]].isin(range(RATE_MAX + 1)).all().all()
    assert np.isfinite(frame.select_dtypes("number").to_numpy(np.float64)).all()
    steps = frame.groupby("case_id")["time"].diff().dropna()
    assert (steps == CANONICAL.step_s).all()  # consecutive steps on the grid, no holes
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False)) == report.to_dict()


# -- dosewise data inspect -----------------------------------------------------------------------------


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def spoiled_cases(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """One artefact, one exact duplicate, two rows out of order and a case with an epoch-millisecond time."""
    rows = cohort()
    rows.loc[row_of(rows, "1", 5), "MAP"] = "300"
    rows.loc[row_of(rows, "2", 7), "time"] = "1700000000000"
    rows = pd.concat([rows, rows.iloc[[2]]], ignore_index=True)
    rows.iloc[[0, 1]] = rows.iloc[[1, 0]].to_numpy()
    return rows, write_csv(tmp_path / "cases.csv", rows)


def test_data_inspect_detects_an_anesthesia_file_and_writes_its_report(spoiled_cases: tuple[pd.DataFrame, Path]) -> None:
    rows, path = spoiled_cases
    result = invoke("data", "inspect", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rows_total"] == len(rows) and report["cases"] == 2
    assert list(report["cases_dropped"]) == ["2"] and report["cases_dropped"]["2"].startswith("time jumps from")
    assert report["artefacts_masked"]["MAP"] == 1 and report["artefacts_by_case"] == {"1": 1}
    assert report["values_carried_forward"]["MAP"] == 1
    assert report["rows_duplicate"] == 1 and report["rows_reordered"] > 0
    assert report == inspect_data(path).to_dict()

    table = invoke("data", "inspect", path, "--kind", "anesthesia")
    assert table.exit_code == 0, table.output
    for text in ("rows_duplicate", "artefacts masked: MAP", "carried forward: MAP", "dropped: case 2", "time jumps from"):
        assert text in table.output, text


def test_data_inspect_reads_vitaldb_names_detected_or_by_preset(tmp_path: Path) -> None:
    rows = cohort().rename(columns={"case_id": VITALDB.case_id, "time": VITALDB.time, **VITALDB.tracks})
    path = tmp_path / "vitaldb.parquet"
    rows.to_parquet(path, index=False)
    detected = invoke("data", "inspect", path, "--json")
    chosen = invoke("data", "inspect", path, "--json", "--data-preset", "vitaldb")
    assert detected.exit_code == chosen.exit_code == 0, detected.output + chosen.output
    assert json.loads(detected.output) == json.loads(chosen.output)
    assert json.loads(detected.output)["cases"] == 3 and isinstance(inspect_data(path, data_preset="vitaldb"), CaseReport)

    wrong = invoke("data", "inspect", path, "--data-preset", "canonical")
    assert wrong.exit_code == 2 and "missing columns 'case_id', 'time', 'BIS', 'MAP'" in wrong.output and "Traceback" not in wrong.output


def test_data_inspect_keeps_vancomycin_and_refuses_unknown_kinds(tmp_path: Path) -> None:
    vanco = tmp_path / "vanco.csv"
    simulate_vancomycin(vanco, 5, 0)
    result = invoke("data", "inspect", vanco, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["patients"] == 5 and isinstance(inspect_data(vanco), DataReport)

    cases = write_csv(tmp_path / "cases.csv", cohort())
    other = write_csv(tmp_path / "other.csv", pd.DataFrame({"a": [1], "b": [2]}))
    expectations = [
        (("--kind", "insulin"), cases, "unknown data kind 'insulin'; expected one of: vancomycin, anesthesia"),
        (("--data-preset", "mimic"), cases, "unknown data preset 'mimic'; expected one of: canonical, vitaldb"),
        (("--kind", "vancomycin"), cases, "missing columns 'patient_id'"),
        (("--kind", "vancomycin", "--data-preset", "vitaldb"), cases, "data preset 'vitaldb' names anesthesia columns"),
        ((), other, f"{other}: cannot tell the kind of data from its columns"),
    ]
    for options, path, message in expectations:
        result = invoke("data", "inspect", path, *options)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    from_config = invoke("data", "inspect", cases, "--config", "planner", "--json")  # a planner config reads anesthesia series
    assert from_config.exit_code == 0 and json.loads(from_config.output)["cases"] == 3, from_config.output
    with pytest.raises(ConfigError, match="either a config or a data preset"):
        inspect_data(cases, config="planner", data_preset="canonical")


def test_train_planner_saves_the_load_report(tiny_cases_file: Path, tmp_path: Path) -> None:
    from dosewise.planner.run import train_from_file
    from tests.planner.conftest import tiny_run

    rows = pd.read_parquet(tiny_cases_file)
    rows.loc[3, "MAP"] = 300.0  # one flush, masked and counted
    path = tmp_path / "cases.parquet"
    rows.to_parquet(path, index=False)
    out = tmp_path / "run"
    said: list[str] = []
    train_from_file(tiny_run(), path, out, echo=said.append)
    assert "masked 1 vital values outside their physiological bounds as missing: {'MAP': 1}" in said
    saved = json.loads((out / "data_report.json").read_text())
    assert saved == load_cases(path, CANONICAL)[1].to_dict()
    assert saved["artefacts_masked"]["MAP"] == 1 and saved["rows_used"] == len(rows)
