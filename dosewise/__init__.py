"""dosewise: offline RL for drug dosing."""

__version__ = "0.1.0"
