"""Loading must either point at the exact bad line or count what it drops; these
tests pin both, on tiny files written per test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest

from dosewise.data import FEATURES, DataConfig, DataError, load_table, observed_reward

CONFIG = DataConfig()
DEFAULTS = {
    "patient_id": "P001",
    "time": "0",
    "vanco_level": "15",
    "creatinine": "1.0",
    "wbc": "8",
    "bun": "15",
    "temperature": "37",
    "sbp": "120",
    "heart_rate": "80",
    "action": "0.0",
    "reward": "0.5",
}
COLUMNS = list(DEFAULTS)


def record(**values: object) -> dict[str, str]:
    return {**DEFAULTS, **{name: str(value) for name, value in values.items()}}


def write_csv(path: Path, records: list[dict[str, str]], columns: list[str] = COLUMNS) -> Path:
    lines = [",".join(columns)] + [",".join(row.get(name, "") for name in columns) for row in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def three_rows() -> list[dict[str, str]]:
    return [
        record(patient_id="P001", time=0),
        record(patient_id="P001", time=6),
        record(patient_id="P002", time=0),
    ]


def test_valid_csv_loads_with_report(tmp_path: Path) -> None:
    frame, report = load_table(write_csv(tmp_path / "data.csv", three_rows()), CONFIG)

    assert list(frame.columns) == ["patient_id", "time", *FEATURES, "action", "reward", "line"]
    assert all(frame[name].dtype == np.float64 for name in ["time", *FEATURES, "action", "reward"])
    assert frame["line"].tolist() == [2, 3, 4]
    assert (report.rows_total, report.rows_dropped_nan, report.rows_valid) == (3, 0, 3)
    assert (report.patients, report.transitions, report.reward_source) == (2, 3, "column")
    assert report.dropped_nan_by_column == {}
    assert report.feature_ranges["vanco_level"] == (15.0, 15.0)
    assert report.action_range == (0.0, 0.0)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["feature_ranges"]["creatinine"] == {"min": 1.0, "max": 1.0}
    assert as_dict["action_range"] == {"min": 0.0, "max": 0.0}


def test_unsupported_suffix_names_path_and_accepted_types(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError) as error:
        load_table(path, CONFIG)
    assert "data.xlsx" in str(error.value)
    assert ".csv" in str(error.value) and ".parquet" in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.csv: no such file"):
        load_table(tmp_path / "nowhere.csv", CONFIG)


def test_missing_column_lists_expected_and_found(tmp_path: Path) -> None:
    columns = [name for name in COLUMNS if name != "wbc"]
    path = write_csv(tmp_path / "data.csv", three_rows(), columns)
    with pytest.raises(DataError) as error:
        load_table(path, CONFIG)
    message = str(error.value)
    assert "data.csv: missing column 'wbc'; expected columns: patient_id, time, vanco_level" in message
    assert "found: patient_id, time, vanco_level, creatinine, bun" in message


@pytest.mark.parametrize("column", ["time", "creatinine", "action", "reward"])
def test_non_numeric_value_points_at_line_patient_and_column(tmp_path: Path, column: str) -> None:
    rows = three_rows()
    rows[2][column] = "abc"
    with pytest.raises(DataError) as error:
        load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)
    assert str(error.value) == (
        f"{tmp_path / 'data.csv'} line 4 (patient 'P002'): column '{column}' has value 'abc'; expected a finite number"
    )


def test_infinite_value_is_an_error_and_first_bad_line_is_reported(tmp_path: Path) -> None:
    rows = three_rows()
    rows[1]["sbp"] = "inf"
    rows[2]["wbc"] = "x"
    with pytest.raises(DataError) as error:
        load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)
    message = str(error.value)
    assert "data.csv line 3 (patient 'P001'): column 'sbp' has value 'inf'" in message
    assert "1 more invalid values" in message


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    header, first, second = write_csv(path, three_rows()[:2]).read_text().splitlines()
    path.write_text("\n".join([header, first, "", second.replace(",120,", ",oops,")]) + "\n")
    with pytest.raises(DataError, match=r"data.csv line 4 \(patient 'P001'\): column 'sbp' has value 'oops'"):
        load_table(path, CONFIG)


def test_rows_with_missing_values_are_dropped_and_counted_per_column(tmp_path: Path) -> None:
    rows = [
        record(patient_id="P001", time=0),
        record(patient_id="P001", time=6, wbc=""),
        record(patient_id="P001", time=12, wbc="", bun="NA"),
        record(patient_id="P002", time=0, reward=" "),
        record(patient_id="", time=0),
        record(patient_id="P002", time=6),
    ]
    frame, report = load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)

    assert (report.rows_total, report.rows_dropped_nan, report.rows_valid) == (6, 4, 2)
    assert report.dropped_nan_by_column == {"patient_id": 1, "wbc": 2, "bun": 1, "reward": 1}
    assert frame["line"].tolist() == [2, 7]
    assert not frame.isna().any().any()


def test_action_outside_bounds_names_value_and_bounds(tmp_path: Path) -> None:
    rows = three_rows()
    rows[1]["action"] = "1.5"
    with pytest.raises(DataError) as error:
        load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)
    message = str(error.value)
    assert "data.csv line 3 (patient 'P001'): column 'action' has value '1.5'" in message
    assert "[-1.0, 1.0]" in message


def test_declared_bounds_are_respected(tmp_path: Path) -> None:
    rows = three_rows()
    rows[1]["action"] = "250"
    _frame, report = load_table(write_csv(tmp_path / "data.csv", rows), DataConfig(action_low=0, action_high=500))
    assert report.action_range == (0.0, 250.0)


def test_duplicate_patient_time_names_both_lines(tmp_path: Path) -> None:
    rows = [*three_rows(), record(patient_id="P001", time="6.0")]
    with pytest.raises(DataError) as error:
        load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)
    message = str(error.value)
    assert "data.csv lines 3 and 5 (patient 'P001')" in message
    assert "time 6.0" in message


def test_no_valid_rows(tmp_path: Path) -> None:
    rows = [record(time=0, wbc=""), record(time=1, bun="")]
    with pytest.raises(DataError, match=r"data.csv: no valid rows: all 2 rows .*wbc: 1, bun: 1"):
        load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)


def test_header_only_file_has_no_valid_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.csv: no valid rows"):
        load_table(write_csv(tmp_path / "data.csv", []), CONFIG)


def test_shuffled_file_is_sorted_by_patient_then_numeric_time(tmp_path: Path) -> None:
    rows = [
        record(patient_id="P002", time=10),
        record(patient_id="P001", time=10),
        record(patient_id="P002", time=2),
        record(patient_id="P001", time=2),
        record(patient_id="P001", time=0),
    ]
    frame, _ = load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)
    assert frame["patient_id"].tolist() == ["P001", "P001", "P001", "P002", "P002"]
    assert frame["time"].tolist() == [0.0, 2.0, 10.0, 2.0, 10.0]
    assert frame["line"].tolist() == [6, 5, 3, 4, 2]
    assert frame.index.tolist() == list(range(5))


def test_numeric_looking_patient_ids_stay_strings(tmp_path: Path) -> None:
    rows = [record(patient_id="007", time=0), record(patient_id="12", time=0)]
    frame, _ = load_table(write_csv(tmp_path / "data.csv", rows), CONFIG)
    assert frame["patient_id"].tolist() == ["007", "12"]
    assert all(isinstance(patient, str) for patient in frame["patient_id"])


def test_parquet_loads_like_csv(tmp_path: Path) -> None:
    rows = [*three_rows(), record(patient_id="P002", time=6, wbc="")]
    rows[0]["vanco_level"] = "12.25"
    csv_path = write_csv(tmp_path / "data.csv", rows)
    typed = pd.read_csv(csv_path, dtype={"patient_id": str})
    parquet_path = tmp_path / "data.parquet"
    typed.sample(frac=1.0, random_state=0).to_parquet(parquet_path, index=False)

    from_csv, csv_report = load_table(csv_path, CONFIG)
    from_parquet, parquet_report = load_table(parquet_path, CONFIG)

    pd.testing.assert_frame_equal(from_csv.drop(columns="line"), from_parquet.drop(columns="line"))
    assert {**csv_report.to_dict(), "path": ""} == {**parquet_report.to_dict(), "path": ""}


def test_parquet_errors_use_row_numbers_and_ids_stay_strings(tmp_path: Path) -> None:
    table = pd.DataFrame({name: [float(DEFAULTS[name])] * 2 for name in COLUMNS if name != "patient_id"})
    table.insert(0, "patient_id", [7, 8])
    table["creatinine"] = table["creatinine"].astype(object)
    table.loc[1, "creatinine"] = "abc"
    table["creatinine"] = table["creatinine"].astype(str)
    path = tmp_path / "data.parquet"
    table.to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"data.parquet row 2 \(patient '8'\): column 'creatinine' has value 'abc'"):
        load_table(path, CONFIG)

    table.loc[1, "creatinine"] = "1.0"
    table.to_parquet(path, index=False)
    frame, _ = load_table(path, CONFIG)
    assert frame["patient_id"].tolist() == ["7", "8"]


def test_reward_is_computed_when_column_is_absent(tmp_path: Path) -> None:
    rows = [
        record(time=0, vanco_level=15, creatinine=1.0),  # in window, baseline creatinine
        record(time=1, vanco_level=5, creatinine=1.5),  # -(10-5)/10 - 2*(1.5/1.0 - 1)
        record(time=2, vanco_level=30, creatinine=0.8),  # -(30-20)/20, creatinine fell: no penalty
    ]
    columns = [name for name in COLUMNS if name != "reward"]
    frame, report = load_table(write_csv(tmp_path / "data.csv", rows, columns), CONFIG)
    assert report.reward_source == "computed"
    np.testing.assert_allclose(frame["reward"], [1.0, -1.5, -0.5])


def test_observed_reward_uses_each_patients_earliest_creatinine() -> None:
    frame = pd.DataFrame(
        {
            "patient_id": ["B", "A", "A"],
            "time": [0.0, 4.0, 0.0],
            "vanco_level": [12.0, 15.0, 15.0],
            "creatinine": [3.0, 2.0, 1.0],
        }
    )
    np.testing.assert_allclose(observed_reward(frame, CONFIG), [1.0, -1.0, 1.0])


def test_config_rejects_low_not_below_high() -> None:
    with pytest.raises(pydantic.ValidationError, match="action_low"):
        DataConfig(action_low=1.0, action_high=1.0)
    with pytest.raises(pydantic.ValidationError):
        DataConfig(action_low=2.0, action_high=1.0)


def test_config_is_frozen_and_strict() -> None:
    with pytest.raises(pydantic.ValidationError):
        DataConfig(unknown="x")
    with pytest.raises(pydantic.ValidationError):
        DataConfig(features=("wbc", "wbc"))
    with pytest.raises(pydantic.ValidationError):
        CONFIG.action = "dose"


def test_parquet_with_patient_id_as_index(tmp_path: Path) -> None:
    typed = pd.read_csv(write_csv(tmp_path / "data.csv", three_rows()), dtype={"patient_id": str})
    typed.set_index("patient_id").to_parquet(tmp_path / "data.parquet")
    frame, _ = load_table(tmp_path / "data.parquet", CONFIG)
    assert frame["patient_id"].tolist() == ["P001", "P001", "P002"]


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("")
    with pytest.raises(DataError, match="data.csv: the file is empty"):
        load_table(path, CONFIG)


def test_computed_reward_needs_positive_first_creatinine(tmp_path: Path) -> None:
    columns = [name for name in COLUMNS if name != "reward"]
    path = write_csv(tmp_path / "data.csv", [record(patient_id="P009", creatinine=0)], columns)
    with pytest.raises(DataError, match="patient 'P009': first creatinine is 0.0"):
        load_table(path, CONFIG)
