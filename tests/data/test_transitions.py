"""Transitions decide what the agent believes follows what; these tests pin the
linking rules (next valid row, terminal last row) and the scaler's round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dosewise.data import (
    FEATURES,
    DataConfig,
    Normalizer,
    build_transitions,
    load_table,
    load_transitions,
)

CONFIG = DataConfig()
HEADER = "patient_id,time," + ",".join(FEATURES) + ",action,reward"


def write_rows(path: Path, rows: list[str]) -> Path:
    """Rows are 'patient,time,level,wbc,action,reward'; other features get fixed values."""
    lines = [HEADER]
    for row in rows:
        patient, time, level, wbc, action, reward = row.split(",")
        lines.append(f"{patient},{time},{level},1.0,{wbc},15,37,120,80,{action},{reward}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_next_state_is_next_row_and_last_row_is_terminal(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "data.csv",
        ["P2,0,20,8,0.5,0", "P1,6,12,8,0.2,1", "P1,0,11,8,0.1,2", "P2,6,21,8,0.6,3", "P1,12,13,8,0.3,4"],
    )
    data, report = load_transitions(path, CONFIG)

    assert data.n == report.transitions == 5
    assert data.feature_names == FEATURES
    assert data.patient_ids.tolist() == ["P1", "P1", "P1", "P2", "P2"]
    np.testing.assert_array_equal(data.observations[:, 0], [11, 12, 13, 20, 21])
    np.testing.assert_array_equal(data.next_observations[:, 0], [12, 13, 13, 21, 21])
    np.testing.assert_array_equal(data.dones, [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(data.episode_starts, [True, False, False, True, False])
    np.testing.assert_allclose(data.actions[:, 0], [0.1, 0.2, 0.3, 0.5, 0.6])
    np.testing.assert_array_equal(data.rewards, [2, 1, 4, 0, 3])
    np.testing.assert_array_equal(data.times, [0, 6, 12, 0, 6])
    assert data.episode_slices() == [slice(0, 3), slice(3, 5)]


def test_arrays_have_declared_shapes_and_dtypes(tmp_path: Path) -> None:
    data, _ = load_transitions(write_rows(tmp_path / "data.csv", ["A,0,15,8,0,0", "B,0,15,8,0,0"]), CONFIG)
    d = len(FEATURES)
    assert data.observations.shape == data.next_observations.shape == (2, d)
    assert data.actions.shape == (2, 1)
    assert data.rewards.shape == data.dones.shape == data.times.shape == data.episode_starts.shape == (2,)
    for array in (data.observations, data.next_observations, data.actions, data.rewards, data.dones):
        assert array.dtype == np.float32
    assert data.times.dtype == np.float64
    assert data.episode_starts.dtype == bool
    assert data.patient_ids.dtype == object
    np.testing.assert_array_equal(data.dones, [1, 1])


def test_dropped_middle_row_links_across_the_gap(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "data.csv", ["P1,0,11,8,0,0", "P1,6,12,,0,0", "P1,12,13,8,0,0"])
    data, report = load_transitions(path, CONFIG)
    assert (report.rows_total, report.rows_dropped_nan, data.n) == (3, 1, 2)
    np.testing.assert_array_equal(data.observations[:, 0], [11, 13])
    np.testing.assert_array_equal(data.next_observations[:, 0], [13, 13])
    np.testing.assert_array_equal(data.dones, [0, 1])


def test_one_transition_per_valid_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [f"P{patient},{time},{rng.uniform(5, 25):.3f},8,0,0" for patient in range(7) for time in range(5)]
    rows[3] = rows[3].replace(",8,", ",,")
    rows[17] = rows[17].replace(",8,", ",,")
    frame, report = load_table(write_rows(tmp_path / "data.csv", rows), CONFIG)
    data = build_transitions(frame, CONFIG)
    assert report.rows_total == 35
    assert data.n == report.rows_valid == report.transitions == 33
    assert int(data.dones.sum()) == int(data.episode_starts.sum()) == len(data.episode_slices()) == 7


def test_normalizer_standardises_and_floors_constant_features() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    normalizer = Normalizer.fit(x)
    np.testing.assert_allclose(normalizer.mean, [2.0, 5.0])
    np.testing.assert_allclose(normalizer.std, [1.0, 1e-6])
    scaled = normalizer.normalize(x)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[-1.0, 0.0], [1.0, 0.0]])


def test_normalizer_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    normalizer = Normalizer.fit(np.random.default_rng(1).normal(3.0, 2.0, size=(50, 4)))
    torch.save({"normalizer": normalizer.to_dict()}, tmp_path / "model.pt")
    restored = Normalizer.from_dict(torch.load(tmp_path / "model.pt", weights_only=True)["normalizer"])
    np.testing.assert_array_equal(restored.mean, normalizer.mean)
    np.testing.assert_array_equal(restored.std, normalizer.std)
    assert restored.mean.dtype == restored.std.dtype == np.float32


def test_normalizer_works_on_torch_tensors() -> None:
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    normalizer = Normalizer.fit(x)
    scaled = normalizer.normalize(torch.from_numpy(x))
    assert isinstance(scaled, torch.Tensor) and scaled.dtype == torch.float32
    np.testing.assert_allclose(scaled.numpy(), normalizer.normalize(x), rtol=1e-6, atol=1e-6)


def test_normalizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Normalizer.fit(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        Normalizer.from_dict({"mean": [0.0, 1.0], "std": [1.0]})
