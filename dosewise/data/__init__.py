"""Tabular dosing data: validated loading, transitions for offline RL, feature scaling."""

from dosewise.data.loading import DataError, DataReport, load_table, observed_reward
from dosewise.data.schema import FEATURES, DataConfig
from dosewise.data.transitions import Normalizer, Transitions, build_transitions, load_transitions

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
