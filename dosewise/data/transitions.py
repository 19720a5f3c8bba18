"""Turns a cleaned table into the (s, a, r, s', done) arrays offline RL trains on,
and the feature scaling that must travel with a trained model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from dosewise.data.loading import DataReport, load_table
from dosewise.data.schema import DataConfig

# Floor for a feature's standard deviation, so a constant feature does not divide by ~0.
MIN_STD = 1e-6

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


@dataclass(frozen=True, eq=False)
class Transitions:
    """One transition per valid row, grouped by patient and ordered by time."""

    observations: np.ndarray  # [n, d] float32
    actions: np.ndarray  # [n, 1] float32
    rewards: np.ndarray  # [n] float32
    next_observations: np.ndarray  # [n, d] float32; equals observations where done
    dones: np.ndarray  # [n] float32; 1 on each patient's last row
    patient_ids: np.ndarray  # [n] object (str)
    times: np.ndarray  # [n] float64, hours
    episode_starts: np.ndarray  # [n] bool; True on each patient's first row
    feature_names: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.rewards)

    def episode_slices(self) -> list[slice]:
        """The rows of each patient, in order."""
        starts = np.flatnonzero(self.episode_starts)
        ends = np.append(starts[1:], self.n)
        return [slice(int(start), int(end)) for start, end in zip(starts, ends)]


def build_transitions(frame: pd.DataFrame, config: DataConfig) -> Transitions:
    """Link each row to the patient's next valid row; a patient's last row is terminal (s' = s).

    Expects a frame as returned by `load_table`; rows are (re)sorted by (patient, time). The state
    is `config.features` followed by the optional features the frame has (`DataConfig.state_features`).
    """
    frame = frame.sort_values([config.patient_id, config.time], kind="stable")
    n = len(frame)
    features = config.state_features(frame.columns)
    patient_ids = frame[config.patient_id].astype(str).to_numpy(dtype=object)
    observations = frame[list(features)].to_numpy(dtype=np.float32)

    same_patient_as_next = patient_ids[1:] == patient_ids[:-1]
    last_of_patient = np.ones(n, dtype=bool)
    last_of_patient[:-1] = ~same_patient_as_next
    first_of_patient = np.ones(n, dtype=bool)
    first_of_patient[1:] = ~same_patient_as_next
    row = np.arange(n)
    next_row = np.where(last_of_patient, row, row + 1)

    return Transitions(
        observations=observations,
        actions=frame[[config.action]].to_numpy(dtype=np.float32),
        rewards=frame[config.reward].to_numpy(dtype=np.float32),
        next_observations=observations[next_row],
        dones=last_of_patient.astype(np.float32),
        patient_ids=patient_ids,
        times=frame[config.time].to_numpy(dtype=np.float64),
        episode_starts=first_of_patient,
        feature_names=features,
    )


def load_transitions(path: str | Path, config: DataConfig) -> tuple[Transitions, DataReport]:
    frame, report = load_table(path, config)
    return build_transitions(frame, config), report


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Per-feature standardisation fitted on the training data and stored with the model."""

    mean: np.ndarray  # [d] float32
    std: np.ndarray  # [d] float32, at least MIN_STD

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalizer:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Normalizer.fit needs a non-empty [n, d] array, got shape {x.shape}")
        return cls(
            mean=x.mean(axis=0).astype(np.float32),
            std=np.maximum(x.std(axis=0), MIN_STD).astype(np.float32),
        )

    def normalize(self, x: ArrayOrTensor) -> ArrayOrTensor:
        """Standardise the last axis of a numpy array (returns float32) or torch tensor (keeps device)."""
        if isinstance(x, torch.Tensor):
            x = x if x.is_floating_point() else x.float()
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)
            return (x - mean) / std
        return (np.asarray(x, dtype=np.float32) - self.mean) / self.std

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists only, so checkpoints load with torch.load(weights_only=True)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        mean = np.asarray(data["mean"], dtype=np.float32)
        std = np.asarray(data["std"], dtype=np.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"Normalizer mean and std must be equal-length lists, got {mean.shape} and {std.shape}")
        return cls(mean=mean, std=std)
