"""Where each piece of a dosing record lives in the user's table, so any file
layout can be used without renaming its columns first."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, model_validator

FEATURES: tuple[str, ...] = (
    "vanco_level",
    "creatinine",
    "wbc",
    "bun",
    "temperature",
    "sbp",
    "heart_rate",
)
# The regimen and covariates that make the state Markov for a dosing decision: without the dose
# being given, the same level means different things. Optional: they join the state, in this
# order after `features`, when the file has them (see DataConfig.optional_features).
DOSE_FEATURES: tuple[str, ...] = (
    "dose_mg",  # maintenance dose per administration in force at the row, before the row's decision
    "interval_h",  # dosing interval
    "hours_since_dose",  # from the start of the last administration to the row's observation
    "weight_kg",
    "age",
    "dialysis",  # 1 on dialysis, 0 not
)
# Columns that are not part of the state but rebuild a patient's dosing record for model-informed
# dosing (`dosewise.algos.dosing_history`): carried through the loader when present, missing cells allowed.
RECORD_COLUMNS: tuple[str, ...] = (
    "sex",  # 1 male, 0 female: the creatinine clearance estimate needs it
    "loading_dose_mg",  # amount of the course's first administration, mg (the same on every row of a patient)
)
# Features that are flags: any value other than 0 or 1 is an error in the data.
BINARY_FEATURES: frozenset[str] = frozenset({"dialysis"})

# Physiologically possible range of each vancomycin state feature, in the units the data uses:
# vanco_level mg/L, creatinine mg/dL, wbc K/µL (10^9/L), bun mg/dL, temperature °C, sbp mmHg,
# heart_rate bpm, dose_mg mg, interval_h and hours_since_dose h, weight_kg kg, age years, dialysis
# 0/1 (BINARY_FEATURES: exactly 0 or 1). A state outside it is a typing or unit error (381 °C, creatinine -1.4), so
# recommending for it needs an explicit override; features not listed here have no bound.
PHYSIOLOGICAL_BOUNDS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "vanco_level": (0.0, 150.0),
        "creatinine": (0.1, 20.0),
        "wbc": (0.0, 200.0),
        "bun": (1.0, 300.0),
        "temperature": (25.0, 45.0),
        "sbp": (30.0, 300.0),
        "heart_rate": (20.0, 300.0),
        "dose_mg": (0.0, 6000.0),
        "interval_h": (1.0, 72.0),
        "hours_since_dose": (0.0, 168.0),
        "weight_kg": (20.0, 350.0),
        "age": (0.0, 120.0),
        "dialysis": (0.0, 1.0),
    }
)
FEATURE_UNITS: Mapping[str, str] = MappingProxyType(
    {
        "vanco_level": "mg/L",
        "creatinine": "mg/dL",
        "wbc": "K/µL",
        "bun": "mg/dL",
        "temperature": "°C",
        "sbp": "mmHg",
        "heart_rate": "bpm",
        "dose_mg": "mg",
        "interval_h": "h",
        "hours_since_dose": "h",
        "weight_kg": "kg",
        "age": "y",
        "dialysis": "0/1",
    }
)

# A patient state inside every physiological range, in the units above: the seven labs and vitals,
# then the dose being given and the patient. For examples, tests and benches; a run trained
# without the dose columns takes the first seven.
EXAMPLE_STATE: Mapping[str, float] = MappingProxyType(
    {
        "vanco_level": 25.0,
        "creatinine": 1.1,
        "wbc": 12.0,
        "bun": 18.0,
        "temperature": 38.2,
        "sbp": 118.0,
        "heart_rate": 96.0,
        "dose_mg": 1250.0,
        "interval_h": 12.0,
        "hours_since_dose": 8.0,
        "weight_kg": 80.0,
        "age": 64.0,
        "dialysis": 0.0,
    }
)

# The loader adds this column (source line/row number), so no data column may use it.
LINE_COLUMN = "line"


class DataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Column identifying the patient; each patient's rows form one episode.
    patient_id: str = "patient_id"
    # Column with the observation time in hours (numeric); orders a patient's rows.
    time: str = "time"
    # Columns that make up the state vector, in this order.
    features: tuple[str, ...] = FEATURES
    # Columns that join the state after `features`, in this order, when the file has them (the
    # dose-aware state). A trained run records those it found in `features` and clears this, so its
    # model asks for exactly the columns it was trained on; () reads `features` only.
    optional_features: tuple[str, ...] = DOSE_FEATURES
    # Column with the dose decision taken at that time (the action).
    action: str = "action"
    # Smallest action the data may contain; a smaller value is an error.
    action_low: float = -1.0
    # Largest action the data may contain; a larger value is an error.
    action_high: float = 1.0
    # Reward column; when the file has no such column, rewards are computed by observed_reward.
    reward: str = "reward"
    # Feature holding the drug trough level in mg/L (only used by the computed reward).
    level_feature: str = "vanco_level"
    # Feature holding serum creatinine (only used by the computed reward).
    creatinine_feature: str = "creatinine"

    @model_validator(mode="after")
    def _check_consistent(self) -> DataConfig:
        if not self.action_low < self.action_high:
            raise ValueError(f"action_low ({self.action_low}) must be smaller than action_high ({self.action_high})")
        if not self.features:
            raise ValueError("features must name at least one column")
        columns = [self.patient_id, self.time, *self.features, *self.optional_state, self.action, self.reward]
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise ValueError(f"each column may play only one role; used more than once: {repeated}")
        if LINE_COLUMN in columns:
            raise ValueError(f"the column name '{LINE_COLUMN}' is reserved for the source line number")
        return self

    @property
    def optional_state(self) -> tuple[str, ...]:
        """The optional features that are not already among `features` (those are used once, in place)."""
        return tuple(name for name in self.optional_features if name not in self.features)

    def state_features(self, columns: Iterable[str]) -> tuple[str, ...]:
        """The state of a file with these columns: `features`, then the optional features it has."""
        present = set(columns)
        return self.features + tuple(name for name in self.optional_state if name in present)

    def with_features(self, features: Sequence[str]) -> DataConfig:
        """This config with exactly `features` as the state, optional columns no longer looked for."""
        return DataConfig(**{**self.model_dump(), "features": tuple(features), "optional_features": ()})
