"""Tabular dosing data: validated loading, transitions for offline RL, feature scaling."""

from dosewise.data.loading import DataError, DataReport, load_table, observed_reward
from dosewise.data.schema import FEATURES, DataConfig
from dosewise.data.transitions import (
    Normalizer,
    Transitions,
    build_transitions,
    load_transitions,
)

__all__ = [
    "FEATURES",
    "DataConfig",
    "DataError",
    "DataReport",
    "Normalizer",
    "Transitions",
    "build_transitions",
    "load_table",
    "load_transitions",
    "observed_reward",
]

# Anesthesia planner data: intraoperative cases and their training windows.
from dosewise.data.anesthesia import (
    CANONICAL,
    VITALDB,
    AnesthesiaDataConfig,
    AnesthesiaReward,
    CaseReport,
    load_cases,
)
from dosewise.data.windows import (
    WindowConfig,
    Windows,
    build_windows,
    split_by_case,
    split_case_ids,
)

__all__ += [
    "CANONICAL",
    "VITALDB",
    "AnesthesiaDataConfig",
    "AnesthesiaReward",
    "CaseReport",
    "WindowConfig",
    "Windows",
    "build_windows",
    "load_cases",
    "split_by_case",
    "split_case_ids",
]
