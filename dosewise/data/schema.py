"""Where each piece of a dosing record lives in the user's table, so any file
layout can be used without renaming its columns first."""

from __future__ import annotations

from collections.abc import Mapping
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

# Physiologically possible range of each vancomycin state feature, in the units the data uses:
# vanco_level mg/L, creatinine mg/dL, wbc K/µL (10^9/L), bun mg/dL, temperature °C, sbp mmHg,
# heart_rate bpm. A state outside it is a typing or unit error (381 °C, creatinine -1.4), so
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
        columns = [self.patient_id, self.time, *self.features, self.action, self.reward]
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise ValueError(f"each column may play only one role; used more than once: {repeated}")
        if LINE_COLUMN in columns:
            raise ValueError(f"the column name '{LINE_COLUMN}' is reserved for the source line number")
        return self
