"""Anesthesia loading must point at the exact bad line or count what it changes;
these tests pin both, the VitalDB round trip and the resampling rules, on tiny
files written per test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest

from dosewise.data import (
    CANONICAL,
    VITALDB,
    AnesthesiaDataConfig,
    AnesthesiaReward,
    DataError,
    load_cases,
)
from dosewise.data.anesthesia import (
    CANONICAL_COLUMNS,
    COVARIATES,
    RATES,
    TRACKS,
    VITALS,
    load_case_rows,
)

FLOAT_COLUMNS = ["time", *VITALS, *COVARIATES]


def canonical_frame(steps: dict[str, int], step_s: float = 60.0) -> pd.DataFrame:
    """Cases with distinct, varying values, in the dtypes load_cases returns."""
    parts = []
    for number, (case, count) in enumerate(steps.items()):
        k = np.arange(count)
        parts.append(
            pd.DataFrame(
                {
                    "case_id": case,
                    "time": k * step_s,
                    "BIS": 45.0 + k + number,
                    "MAP": 70.0 + 2 * k + number,
                    "SBP": 110.0 + k,
                    "DBP": 60.0 + k,
                    "HR": 65.0 + number,
                    "PPF20_RATE": 10 + k + number,
                    "RFTN20_RATE": 20 + 2 * k,
                    "age": 40.0 + number,
                    "sex": float(number % 2),
                    "height": 170.0,
                    "weight": 60.0 + number,
                    "asa": 2.0,
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    return frame.astype(dict.fromkeys(FLOAT_COLUMNS, np.float64) | dict.fromkeys(RATES, np.int64))


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def text_rows(steps: dict[str, int]) -> pd.DataFrame:
    """The canonical frame as text cells, ready to be spoiled cell by cell."""
    return canonical_frame(steps).astype(str)


def assert_untouched(report, frame: pd.DataFrame, rows: int, cases: int) -> None:  # type: ignore[no-untyped-def]
    assert (report.rows_total, report.rows_after_resampling, len(frame)) == (rows, rows, rows)
    assert report.cases == cases and report.cases_dropped == {}
    assert report.values_carried_forward == dict.fromkeys(TRACKS, 0)
    assert report.rates_rounded == dict.fromkeys(RATES, 0)
    assert (report.rows_reordered, report.steps_trimmed) == (0, 0)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_canonical_file_loads_unchanged(tmp_path: Path, suffix: str) -> None:
    expected = canonical_frame({"c1": 4, "c2": 3})
    path = tmp_path / f"cases.{suffix}"
    expected.to_csv(path, index=False) if suffix == "csv" else expected.to_parquet(path, index=False)

    frame, report = load_cases(path, CANONICAL)

    pd.testing.assert_frame_equal(frame, expected)
    assert list(frame.columns) == list(CANONICAL_COLUMNS)
    assert_untouched(report, frame, rows=7, cases=2)
    assert json.loads(json.dumps(report.to_dict()))["values_carried_forward"]["BIS"] == 0


def test_missing_column_lists_expected_and_found(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "cases.csv", canonical_frame({"c1": 2}).drop(columns=["MAP", "asa"]))
    with pytest.raises(DataError) as error:
        load_cases(path, CANONICAL)
    message = str(error.value)
    assert message.startswith(f"{path}: missing columns 'MAP', 'asa'; expected columns: case_id, time, BIS, MAP,")
    assert "found: case_id, time, BIS, SBP, DBP, HR, PPF20_RATE, RFTN20_RATE, age, sex, height, weight" in message


def test_missing_vitaldb_column_is_named_as_in_the_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "cases.csv", canonical_frame({"c1": 2}))
    with pytest.raises(DataError, match=r"missing columns 'caseid', 'Time', 'BIS/BIS', 'Solar8000/ART_MBP'"):
        load_cases(path, VITALDB)


@pytest.mark.parametrize("column", ["time", "BIS", "HR", "PPF20_RATE", "weight"])
def test_non_numeric_value_names_file_line_case_and_column(tmp_path: Path, column: str) -> None:
    rows = text_rows({"c1": 2, "c2": 2})
    rows.loc[2, column] = "abc"  # file line 4: the header is line 1
    path = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(DataError) as error:
        load_cases(path, CANONICAL)
    assert str(error.value) == f"{path} line 4 (case 'c2'): column '{column}' has value 'abc'; expected a finite number"


def test_non_numeric_value_in_parquet_names_row_and_both_column_names(tmp_path: Path) -> None:
    rows = text_rows({"c1": 3}).rename(columns={**VITALDB.tracks, "case_id": "caseid", "time": "Time"})
    rows.loc[1, "Solar8000/ART_MBP"] = "--"
    rows.loc[2, "BIS/BIS"] = "inf"
    path = tmp_path / "cases.parquet"
    rows.to_parquet(path, index=False)
    with pytest.raises(DataError) as error:
        load_cases(path, VITALDB)
    assert str(error.value) == (
        f"{path} row 2 (case 'c1'): column 'Solar8000/ART_MBP' (MAP) has value '--'; expected a finite number "
        "(1 more invalid values in this file)"
    )


@pytest.mark.parametrize("column", ["case_id", "time"])
def test_row_without_case_or_time_is_an_error(tmp_path: Path, column: str) -> None:
    rows = text_rows({"c1": 3})
    rows.loc[1, column] = ""
    path = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(DataError, match=rf"cases.csv line 3 \(.*\): column '{column}' is empty"):
        load_cases(path, CANONICAL)


def test_duplicate_case_time_names_both_lines(tmp_path: Path) -> None:
    rows = text_rows({"c1": 3, "c2": 2})
    rows.loc[4, "time"] = "0.0"  # c2's second row repeats c2's time 0
    path = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(DataError) as error:
        load_cases(path, CANONICAL)
    assert str(error.value) == (f"{path} lines 5 and 6 (case 'c2'): both have time 0.0; each (case, time) pair must appear only once")


@pytest.mark.parametrize(("column", "value"), [("PPF20_RATE", "201"), ("RFTN20_RATE", "-1"), ("PPF20_RATE", "200.4")])
def test_rate_out_of_range_names_line_case_column_and_value(tmp_path: Path, column: str, value: str) -> None:
    rows = text_rows({"c1": 2, "c2": 3})
    rows.loc[3, column] = value
    path = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(DataError) as error:
        load_cases(path, CANONICAL)
    assert str(error.value) == (f"{path} line 5 (case 'c2'): column '{column}' has value '{value}' outside the rate levels 0..200 mL/h")


def test_covariate_changing_within_a_case_is_an_error(tmp_path: Path) -> None:
    rows = text_rows({"c1": 2, "c2": 3})
    rows.loc[4, "age"] = "42.0"  # c2 is 41 on its first rows
    path = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(DataError) as error:
        load_cases(path, CANONICAL)
    assert str(error.value) == (
        f"{path} lines 4 and 6 (case 'c2'): column 'age' has '41.0' and '42.0'; covariates must be constant within a case"
    )


def test_sex_must_be_zero_one_or_m_f(tmp_path: Path) -> None:
    rows = text_rows({"c1": 2})
    rows["sex"] = ["f", "F"]
    frame, _ = load_cases(write_csv(tmp_path / "ok.csv", rows), CANONICAL)
    assert frame["sex"].tolist() == [0.0, 0.0]

    for value in ("2", "X"):
        rows["sex"] = ["1", value]
        path = write_csv(tmp_path / "bad.csv", rows)
        with pytest.raises(DataError) as error:
            load_cases(path, CANONICAL)
        assert str(error.value) == (f"{path} line 3 (case 'c1'): column 'sex' has value '{value}'; expected 1 (male) or 0 (female), or M/F")


def test_unsorted_rows_are_sorted_and_counted(tmp_path: Path) -> None:
    expected = canonical_frame({"c1": 4, "c2": 3})
    shuffled = expected.iloc[[4, 0, 2, 1, 3, 6, 5]]  # c1: 0, 2, 1, 3 -> two rows move; c2: 0 then 2, 1 -> two
    frame, report = load_cases(write_csv(tmp_path / "cases.csv", shuffled), CANONICAL)
    pd.testing.assert_frame_equal(frame, expected)
    assert report.rows_reordered == 4


def test_fractional_rates_are_rounded_and_counted(tmp_path: Path) -> None:
    rows = text_rows({"c1": 4})
    rows["PPF20_RATE"] = ["10.4", "10.5", "12.0", "199.6"]
    rows["RFTN20_RATE"] = ["0.49", "3", "3", "3"]
    frame, report = load_cases(write_csv(tmp_path / "cases.csv", rows), CANONICAL)
    assert frame["PPF20_RATE"].tolist() == [10, 11, 12, 200]
    assert frame["RFTN20_RATE"].tolist() == [0, 3, 3, 3]
    assert frame["PPF20_RATE"].dtype == np.int64
    assert report.rates_rounded == {"PPF20_RATE": 3, "RFTN20_RATE": 1}


def to_vitaldb_samples(canonical: pd.DataFrame, sample_s: float = 2.0, step_s: float = 60.0) -> pd.DataFrame:
    """Fine samples whose last value in every step is the canonical one; earlier ones differ."""
    per_step = int(step_s / sample_s)
    fine = canonical.loc[canonical.index.repeat(per_step)].reset_index(drop=True)
    offset = np.tile(np.arange(per_step), len(canonical))
    fine["time"] = fine["time"] + offset * sample_s
    earlier = offset < per_step - 1
    for name in VITALS:
        fine.loc[earlier, name] = fine.loc[earlier, name] + 7.0 + offset[earlier]
    fine.loc[earlier & (offset % 3 == 0), "BIS"] = np.nan  # dropouts inside a step do not matter
    fine["PPF20_RATE"] = fine["PPF20_RATE"].astype(np.float64)  # pumps export floats
    fine.loc[earlier, "PPF20_RATE"] = 3.0
    fine["sex"] = np.where(fine["sex"] == 1.0, "M", "F")
    return fine.rename(columns={**VITALDB.tracks, "case_id": "caseid", "time": "Time"})


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_vitaldb_export_round_trips_to_the_canonical_frame(tmp_path: Path, suffix: str) -> None:
    expected = canonical_frame({"101": 5, "102": 4, "7": 3})
    fine = to_vitaldb_samples(expected)
    assert len(fine) == 12 * 30 and "Solar8000/ART_MBP" in fine.columns
    path = tmp_path / f"vitaldb.{suffix}"
    fine.to_csv(path, index=False) if suffix == "csv" else fine.to_parquet(path, index=False)

    frame, report = load_cases(path, VITALDB)

    pd.testing.assert_frame_equal(frame, expected.sort_values(["case_id", "time"], ignore_index=True))
    assert (report.rows_total, report.rows_after_resampling, report.cases) == (360, 12, 3)
    assert report.values_carried_forward == dict.fromkeys(TRACKS, 0)
    assert report.rates_rounded == dict.fromkeys(RATES, 0)


def test_resampling_takes_the_last_value_of_each_step(tmp_path: Path) -> None:
    rows = pd.DataFrame(
        {
            "time": [5.0, 20.0, 50.0, 61.0, 110.0, 119.0, 130.0],
            "BIS": [40.0, 41.0, 42.0, 43.0, 44.0, np.nan, 46.0],  # step 1: last non-missing is 44
            "MAP": [70.0, 71.0, 72.0, 73.0, 74.0, 75.0, 76.0],
            "PPF20_RATE": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        }
    )
    rows = rows.assign(case_id="c1", SBP=100.0, DBP=50.0, HR=60.0, RFTN20_RATE=0.0, age=30, sex=0, height=1, weight=1)
    rows = rows.assign(asa=1)
    frame, report = load_cases(write_csv(tmp_path / "cases.csv", rows), CANONICAL)
    # Steps start at the case's first time: [5, 65), [65, 125), [125, 185).
    assert frame["time"].tolist() == [5.0, 65.0, 125.0]
    assert frame["BIS"].tolist() == [43.0, 44.0, 46.0]
    assert frame["MAP"].tolist() == [73.0, 75.0, 76.0]
    assert frame["PPF20_RATE"].tolist() == [4, 6, 7]
    assert (report.rows_total, report.rows_after_resampling) == (7, 3)
    assert report.values_carried_forward == dict.fromkeys(TRACKS, 0)


def with_missing_bis(steps: dict[str, int], missing: dict[str, list[int]]) -> pd.DataFrame:
    frame = canonical_frame(steps)
    for case, positions in missing.items():
        rows = frame.index[frame["case_id"] == case][positions]
        frame.loc[rows, "BIS"] = np.nan
    return frame


def test_short_gaps_are_carried_forward_and_counted(tmp_path: Path) -> None:
    frame = with_missing_bis({"c1": 10, "c2": 4}, {"c1": [2, 3, 4, 5, 6], "c2": [1]})
    frame.loc[frame.index[frame["case_id"] == "c2"][2], "time"] = np.nan  # c2 loses its step 2 entirely
    frame = frame.dropna(subset=["time"])
    loaded, report = load_cases(write_csv(tmp_path / "cases.csv", frame), CANONICAL)

    c1 = loaded[loaded["case_id"] == "c1"]
    assert c1["BIS"].tolist() == [45.0, 46.0, 46.0, 46.0, 46.0, 46.0, 46.0, 52.0, 53.0, 54.0]
    c2 = loaded[loaded["case_id"] == "c2"]
    assert c2["time"].tolist() == [0.0, 60.0, 120.0, 180.0]  # the empty step is back on the grid
    assert c2["BIS"].tolist() == [46.0, 46.0, 46.0, 49.0]
    assert c2["PPF20_RATE"].tolist() == [11, 12, 12, 14]  # a pump holds its rate
    assert report.values_carried_forward == {
        "BIS": 5 + 2,
        "MAP": 1,
        "SBP": 1,
        "DBP": 1,
        "HR": 1,
        "PPF20_RATE": 1,
        "RFTN20_RATE": 1,
    }
    assert report.cases == 2 and report.cases_dropped == {}


def test_long_gap_drops_the_case_with_its_reason(tmp_path: Path) -> None:
    frame = with_missing_bis({"c1": 10, "c2": 10}, {"c2": [2, 3, 4, 5, 6, 7]})
    loaded, report = load_cases(write_csv(tmp_path / "cases.csv", frame), CANONICAL)
    assert loaded["case_id"].unique().tolist() == ["c1"]
    assert report.cases == 1
    assert report.cases_dropped == {
        "c2": "'BIS' missing for 6 consecutive steps from time 120 s; at most max_gap_steps=5 are carried forward"
    }
    assert report.values_carried_forward["BIS"] == 0  # dropped cases count nothing

    lenient = CANONICAL.model_copy(update={"max_gap_steps": 6})
    _, report = load_cases(tmp_path / "cases.csv", lenient)
    assert report.cases == 2 and report.values_carried_forward["BIS"] == 6


def test_steps_before_every_track_and_after_a_vital_stops_are_trimmed(tmp_path: Path) -> None:
    frame = with_missing_bis({"c1": 8}, {"c1": [0, 1, 7]})
    frame.loc[0:2, "RFTN20_RATE"] = np.nan  # the remifentanil pump starts at step 3
    loaded, report = load_cases(write_csv(tmp_path / "cases.csv", frame), CANONICAL)
    assert loaded["time"].tolist() == [180.0, 240.0, 300.0, 360.0]
    assert report.steps_trimmed == 4
    assert report.values_carried_forward == dict.fromkeys(TRACKS, 0)


def test_case_without_a_track_is_dropped_and_all_dropped_is_an_error(tmp_path: Path) -> None:
    frame = canonical_frame({"c1": 3, "c2": 3, "c3": 3})
    frame.loc[frame["case_id"] == "c1", "RFTN20_RATE"] = np.nan
    frame["asa"] = frame["asa"].astype(object)
    frame.loc[frame["case_id"] == "c3", "asa"] = ""
    _, report = load_cases(write_csv(tmp_path / "cases.csv", frame), CANONICAL)
    assert report.cases_dropped == {
        "c1": "track 'RFTN20_RATE' has no value",
        "c3": "covariate 'asa' has no value",
    }

    only_bad = frame[frame["case_id"] != "c2"]
    with pytest.raises(DataError, match=r"no usable case: all 2 cases were dropped: case 'c1': track 'RFTN20_RATE'"):
        load_cases(write_csv(tmp_path / "bad.csv", only_bad), CANONICAL)


def test_step_size_is_configurable(tmp_path: Path) -> None:
    expected = canonical_frame({"c1": 3}, step_s=30.0)
    fine = to_vitaldb_samples(expected, sample_s=1.0, step_s=30.0)
    frame, _ = load_cases(write_csv(tmp_path / "cases.csv", fine), VITALDB.model_copy(update={"step_s": 30.0}))
    pd.testing.assert_frame_equal(frame, expected)


def test_config_rejects_incomplete_or_conflicting_mappings() -> None:
    with pytest.raises(pydantic.ValidationError, match="missing: \\['MAP'"):
        AnesthesiaDataConfig(tracks={name: name for name in TRACKS if name != "MAP"})
    with pytest.raises(pydantic.ValidationError, match="used more than once: \\['BIS'\\]"):
        AnesthesiaDataConfig(tracks={**CANONICAL.tracks, "MAP": "BIS"})
    with pytest.raises(pydantic.ValidationError):
        AnesthesiaDataConfig(step=30.0)
    with pytest.raises(pydantic.ValidationError):
        CANONICAL.step_s = 30.0


@pytest.mark.parametrize(
    ("bis", "mean_pressure", "expected"),
    [
        (50, 80, 1.0),  # on target
        (40, 65, 1.0),  # both window edges count as inside / not hypotensive
        (60, 120, 1.0),  # hypertension is not penalised
        (30, 80, -0.5),  # 10 BIS points too deep
        (75, 80, -0.75),  # 15 BIS points too light
        (50, 60, 1.0 - 2.0 - 0.25),  # hypotension costs more than the target bonus
        (50, 64.9, 1.0 - 2.0 - 0.005),
        (20, 45, -1.0 - 2.0 - 1.0),
    ],
)
def test_reward_values(bis: float, mean_pressure: float, expected: float) -> None:
    assert AnesthesiaReward().reward(bis, mean_pressure) == pytest.approx(expected)


def test_reward_is_elementwise_and_hypotension_is_worst() -> None:
    reward = AnesthesiaReward()
    values = reward.reward(np.array([50.0, 100.0, 0.0, 50.0]), np.array([80.0, 80.0, 80.0, 64.0]))
    np.testing.assert_allclose(values, [1.0, -2.0, -2.0, -1.05])
    # A just-hypotensive step at target depth costs as much as a BIS 20 points out of the window.
    assert reward.reward(50, 64.999) == pytest.approx(reward.reward(80, 80), abs=1e-3)
    assert reward.reward(50, 64.999) - reward.reward(50, 65) < -2.0


def test_rows_in_memory_load_as_the_file_does_and_repeated_columns_are_named(tiny_cases_file, tmp_path):
    """The service's JSON history goes through the file loader's checks: same frame and report
    counts; two columns that only differ by spaces are refused, in a file and in memory."""
    raw = pd.read_parquet(tiny_cases_file)
    from_file, file_report = load_cases(tiny_cases_file, CANONICAL)
    in_memory, memory_report = load_case_rows(pd.DataFrame.from_records(raw.to_dict("records")), CANONICAL, "history")
    pd.testing.assert_frame_equal(in_memory, from_file)
    assert memory_report.path == "history" and memory_report.rows_used == file_report.rows_used
    with pytest.raises(DataError, match=r"^history: column name\(s\) 'BIS' given more than once"):
        load_case_rows(raw.assign(**{" BIS": raw["BIS"]}), CANONICAL, "history")
    path = tmp_path / "repeated.csv"
    raw.rename(columns={"MAP": "BIS "}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"repeated.csv: column name\(s\) 'BIS' given more than once"):
        load_cases(path, CANONICAL)
