"""The dose-aware state: optional regimen and covariate columns join the 7 charted features when a
file has them, and a file without them loads and trains exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest
import torch

from dosewise import api
from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.iql import IQLConfig
from dosewise.algos.recommend import StateError
from dosewise.algos.trained import TrainedIQL
from dosewise.config import load_config
from dosewise.data import DataConfig, DataError, load_table, load_transitions
from dosewise.data.schema import DOSE_FEATURES, FEATURE_UNITS, FEATURES, PHYSIOLOGICAL_BOUNDS
from dosewise.sim.vancomycin_clinician import simulate_dataset

STATE_13 = (*FEATURES, *DOSE_FEATURES)
STATE = {"vanco_level": 25.0, "creatinine": 1.1, "wbc": 12.0, "bun": 18.0, "temperature": 38.2, "sbp": 118.0, "heart_rate": 96.0}
DOSE_STATE = {"dose_mg": 1250.0, "interval_h": 12.0, "hours_since_dose": 4.0, "weight_kg": 80.0, "age": 60.0, "dialysis": 0.0}
TRANSITION_FIELDS = ("observations", "actions", "rewards", "next_observations", "dones", "patient_ids", "times", "episode_starts")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """The same simulated courses as a dose-aware file and in the 7-feature seed format."""
    root = tmp_path_factory.mktemp("dose")
    frame = simulate_dataset(24, seed=2)
    dose_aware, seed_format = root / "dose.csv", root / "seed.csv"
    frame.to_csv(dose_aware, index=False)
    frame.drop(columns=[*DOSE_FEATURES, "sex", "loading_dose_mg"]).to_csv(seed_format, index=False)
    return dose_aware, seed_format


def small_run(**data) -> IQLRunConfig:
    return IQLRunConfig(
        data=DataConfig(**data),
        iql=IQLConfig(lr=1e-3, hidden=(16, 16), batch_size=32),
        train=TrainConfig(steps=30, checkpoint_every=0, log_every=10, seed=0),
    )


def assert_same_transitions(a, b) -> None:
    for name in TRANSITION_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes() if x.dtype != object else list(x) == list(y), name
    assert a.feature_names == b.feature_names


# -- loading ---------------------------------------------------------------------------------------


def test_a_seed_format_file_loads_exactly_as_without_optional_features(files):
    _, seed_format = files
    default, report = load_transitions(seed_format, DataConfig())
    plain, plain_report = load_transitions(seed_format, DataConfig(optional_features=()))
    assert_same_transitions(default, plain)
    assert default.feature_names == FEATURES and report.optional_features == ()
    assert report == plain_report and report.to_dict()["optional_features"] == []
    frame, _ = load_table(seed_format, DataConfig())
    assert list(frame.columns) == ["patient_id", "time", *FEATURES, "action", "reward", "line"]


def test_a_dose_aware_file_adds_the_six_columns_in_order_whatever_the_file_order(files, tmp_path):
    dose_aware, seed_format = files
    frame = pd.read_csv(dose_aware)
    kept = frame.dropna(subset=list(FEATURES))  # rows with a charted value missing are dropped
    assert len(kept) < len(frame)
    shuffled = tmp_path / "shuffled.csv"
    frame[list(reversed(frame.columns))].to_csv(shuffled, index=False)
    for path in (dose_aware, shuffled):
        data, report = load_transitions(path, DataConfig())
        assert data.feature_names == STATE_13
        assert report.optional_features == DOSE_FEATURES
        assert list(report.feature_ranges) == list(STATE_13)
        assert report.feature_ranges["interval_h"][1] <= 48.0
        np.testing.assert_array_equal(data.observations[:, 7], kept.sort_values(["patient_id", "time"])["dose_mg"].astype(np.float32))
    # The charted part of the state is the seed-format state, bit for bit.
    seed, _ = load_transitions(seed_format, DataConfig())
    assert data.observations[:, :7].tobytes() == seed.observations.tobytes()
    assert data.next_observations[:, :7].tobytes() == seed.next_observations.tobytes()


def test_only_the_optional_columns_present_join_and_a_config_can_leave_them_out(files, tmp_path):
    dose_aware, _ = files
    partial = tmp_path / "partial.csv"
    pd.read_csv(dose_aware).drop(columns=["dose_mg", "interval_h", "hours_since_dose", "age"]).to_csv(partial, index=False)
    data, report = load_transitions(partial, DataConfig())
    assert data.feature_names == (*FEATURES, "weight_kg", "dialysis") and report.optional_features == ("weight_kg", "dialysis")
    assert load_transitions(dose_aware, DataConfig(optional_features=()))[0].feature_names == FEATURES
    assert load_transitions(dose_aware, DataConfig(optional_features=("dialysis",)))[0].feature_names == (*FEATURES, "dialysis")
    # An optional feature already among the features is used once, where the features put it.
    config = DataConfig(features=("age", *FEATURES))
    assert config.state_features(pd.read_csv(dose_aware).columns) == ("age", *FEATURES, *(n for n in DOSE_FEATURES if n != "age"))


def test_state_features_and_with_features():
    config = DataConfig()
    assert config.optional_features == DOSE_FEATURES
    assert config.state_features(["vanco_level", "dialysis", "dose_mg", "other"]) == (*FEATURES, "dose_mg", "dialysis")
    fixed = config.with_features(STATE_13)
    assert fixed.features == STATE_13 and fixed.optional_features == ()
    assert fixed.state_features(["anything"]) == STATE_13
    with pytest.raises(pydantic.ValidationError, match="used more than once: \\['dose_mg'\\]"):
        DataConfig(action="dose_mg")
    with pytest.raises(pydantic.ValidationError, match="used more than once: \\['age'\\]"):
        DataConfig(optional_features=("age", "age"))


def test_missing_dose_values_drop_their_rows_and_are_counted(files, tmp_path):
    dose_aware, _ = files
    frame = pd.read_csv(dose_aware)
    frame.loc[[3, 10], "dose_mg"] = np.nan
    frame.loc[10, "hours_since_dose"] = np.nan
    path = tmp_path / "gaps.csv"
    frame.to_csv(path, index=False)
    _, report = load_table(path, DataConfig())
    assert report.dropped_nan_by_column["dose_mg"] == 2 and report.dropped_nan_by_column["hours_since_dose"] == 1
    assert report.rows_valid == report.rows_total - report.rows_dropped_nan


@pytest.mark.parametrize(("value", "shown"), [(2, "2"), (0.5, "0.5"), (-1, "-1")])
def test_a_dialysis_value_other_than_0_or_1_names_the_row(files, tmp_path, value, shown):
    dose_aware, _ = files
    frame = pd.read_csv(dose_aware)
    frame["dialysis"] = frame["dialysis"].astype(object)
    frame.loc[4, "dialysis"] = value
    frame.loc[9, "dialysis"] = 7
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_table(path, DataConfig())
    patient = frame.loc[4, "patient_id"]
    assert str(err.value) == (
        f"{path} line 6 (patient '{patient}'): column 'dialysis' has value '{shown}'; expected 0 (no) or 1 (yes) (1 more rows have other values)"
    )
    load_table(path, DataConfig(optional_features=()))  # a run that does not use the column does not check it


def test_flags_written_as_decimals_are_accepted(files, tmp_path):
    dose_aware, _ = files
    frame = pd.read_csv(dose_aware)
    frame["dialysis"] = frame["dialysis"].astype(float)  # 0.0 / 1.0 in the file
    path = tmp_path / "floats.csv"
    frame.to_csv(path, index=False)
    assert set(load_table(path, DataConfig())[0]["dialysis"]) <= {0.0, 1.0}


def test_dose_features_have_bounds_and_units():
    expected = {
        "dose_mg": ((0.0, 6000.0), "mg"),
        "interval_h": ((1.0, 72.0), "h"),
        "hours_since_dose": ((0.0, 168.0), "h"),
        "weight_kg": ((20.0, 350.0), "kg"),
        "age": ((0.0, 120.0), "y"),
        "dialysis": ((0.0, 1.0), "0/1"),
    }
    assert tuple(expected) == DOSE_FEATURES
    for name, (bounds, unit) in expected.items():
        assert PHYSIOLOGICAL_BOUNDS[name] == bounds and FEATURE_UNITS[name] == unit


def test_the_simulated_table_is_inside_the_bounds(files):
    frame = pd.read_csv(files[0])
    for name in DOSE_FEATURES:
        low, high = PHYSIOLOGICAL_BOUNDS[name]
        assert frame[name].between(low, high).all(), name


# -- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory) -> dict[str, Path]:
    dose_aware, seed_format = files
    root = tmp_path_factory.mktemp("runs")
    quiet = lambda _: None
    jobs = {
        "seed": (seed_format, small_run()),
        "seed_plain": (seed_format, small_run(optional_features=())),
        "dose": (dose_aware, small_run()),
    }
    for name, (data, run) in jobs.items():
        api.train_iql_from_file(data, root / name, run.model_copy(update={"data_path": str(data)}), echo=quiet)
    return {name: root / name for name in jobs}


def test_a_seed_format_file_trains_exactly_as_before(runs):
    seed, plain = TrainedIQL.load(runs["seed"]), TrainedIQL.load(runs["seed_plain"])
    assert seed.feature_names == plain.feature_names == FEATURES
    for (name, a), (_, b) in zip(seed.nets.state_dict().items(), plain.nets.state_dict().items()):
        assert torch.equal(a, b), name
    # Nothing was found, so nothing is recorded: the saved config is the one given.
    saved = load_config(runs["seed"] / "config.yaml", IQLRunConfig)
    assert saved.data == DataConfig() and seed.run_config.data == DataConfig()


def test_a_dose_aware_file_trains_a_13_feature_model_that_records_them(runs, files):
    model = TrainedIQL.load(runs["dose"])
    assert model.feature_names == STATE_13
    saved = load_config(runs["dose"] / "config.yaml", IQLRunConfig)
    assert saved.data.features == STATE_13 and saved.data.optional_features == ()
    assert model.run_config.data == saved.data
    assert set(model.feature_ranges) == set(STATE_13)
    # The recorded config reads all 13, and it needs all 13: a file without them is refused.
    with pytest.raises(DataError, match="missing columns 'dose_mg', 'interval_h', 'hours_since_dose', 'weight_kg', 'age', 'dialysis'"):
        load_table(files[1], saved.data)


def test_recommend_needs_exactly_the_features_the_model_was_trained_on(runs):
    dose = api.recommend_iql(runs["dose"], STATE | DOSE_STATE)
    assert -1.0 <= dose.policy_action <= 1.0 and set(dose.state) == set(STATE_13)
    with pytest.raises(
        StateError, match="missing feature\\(s\\) 'dose_mg', 'interval_h', 'hours_since_dose', 'weight_kg', 'age', 'dialysis'"
    ):
        api.recommend_iql(runs["dose"], STATE)
    assert set(api.recommend_iql(runs["seed"], STATE).state) == set(FEATURES)
    with pytest.raises(StateError, match="unknown feature\\(s\\) 'dose_mg'"):
        api.recommend_iql(runs["seed"], STATE | DOSE_STATE)


def test_evaluation_feeds_each_model_its_own_columns(runs, files):
    dose_aware, _ = files
    dose = api.evaluate_iql(runs["dose"], patients=20, seed=3)
    assert dose.offline["num_transitions"] == load_transitions(dose_aware, DataConfig())[0].n
    # A 7-feature model evaluated on the dose-aware file reads only its 7 columns.
    seed = api.evaluate_iql(runs["seed"], patients=20, seed=3, data=dose_aware)
    assert seed.offline["num_transitions"] == dose.offline["num_transitions"]
    assert seed.closed_loop["clinician"] == dose.closed_loop["clinician"]  # same patients, same clinician
    json.dumps(dose.to_dict(), allow_nan=False)
