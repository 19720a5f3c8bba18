"""Surgical-stimulation disturbances: additive (BIS, MAP, CO) profiles over time, as in PAS.

Each profile is a table of breakpoints (minutes, BIS, mmHg, L/min) interpolated linearly.
"""

from __future__ import annotations

import numpy as np

# Struys et al. 2004, Anesthesiology 100:640: intubation, incision, then surgery with peaks.
STRUYS_2004 = np.array(
    [
        [0.0, 0, 0, 0],
        [9.9, 0, 0, 0],
        [10.0, 20, 10, 0.6],
        [12.0, 20, 10, 0.6],
        [13.0, 0, 0, 0],
        [19.9, 0, 0, 0],
        [20.2, 20, 10, 0.5],
        [21.0, 20, 10, 0.5],
        [21.5, 0, 0, 0],
        [26.0, -20, -10, -0.8],
        [27.0, 20, 10, 0.9],
        [28.0, 10, 7, 0.2],
        [36.0, 10, 7, 0.2],
        [37.0, 30, 15, 0.8],
        [37.5, 30, 15, 0.8],
        [38.0, 10, 5, 0.2],
        [41.0, 10, 5, 0.2],
        [41.5, 30, 10, 0.5],
        [42.0, 30, 10, 0.5],
        [43.0, 10, 5, 0.2],
        [47.0, 10, 5, 0.2],
        [47.5, 30, 10, 0.9],
        [50.0, 30, 8, 0.9],
        [51.0, 10, 5, 0.2],
        [56.0, 10, 5, 0.2],
        [56.5, 0, 0, 0],
    ]
)  # [26, 4]

# Dumont et al. 2009, Int J Adapt Control Signal Process 23:435: one stimulation that decays.
DUMONT_2009 = np.array(
    [
        [0.0, 0, 0, 0],
        [19.9, 0, 0, 0],
        [20.0, 20, 5, 0.3],
        [23.0, 20, 10, 0.6],
        [24.0, 15, 10, 0.6],
        [26.0, 12.5, 6, 0.4],
        [30.0, 10.5, 4, 0.3],
        [37.0, 10, 4, 0.3],
        [40.0, 4, 2, 0.1],
        [45.0, 0.5, 0.1, 0.01],
        [50.0, 0, 0, 0],
    ]
)  # [11, 4]

PROFILES: dict[str, np.ndarray] = {"struys2004": STRUYS_2004, "dumont2009": DUMONT_2009}


def step_profile(start_s: float = 600.0, end_s: float = 1200.0) -> np.ndarray:
    """A step of +10 BIS, +5 mmHg, +0.3 L/min between start_s and end_s (PAS's 'step')."""
    a, b = start_s / 60.0, end_s / 60.0
    return np.array([[0.0, 0, 0, 0], [a - 0.01, 0, 0, 0], [a, 10, 5, 0.3], [b - 0.01, 10, 5, 0.3], [b, 0, 0, 0]])


def disturbance(profile: str | np.ndarray, time_s: np.ndarray) -> np.ndarray:
    """Additive (BIS, MAP, CO) at each time, [T, 3]; a name from PROFILES or a [P, 4] breakpoint table."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown disturbance profile {profile!r}; known: {sorted(PROFILES)}")
        profile = PROFILES[profile]
    table = np.asarray(profile, dtype=float)
    if table.ndim != 2 or table.shape[1] != 4:
        raise ValueError(f"a disturbance table has rows (minute, BIS, MAP, CO); got shape {table.shape}")
    minutes = np.asarray(time_s, dtype=float) / 60.0
    return np.stack([np.interp(minutes, table[:, 0], table[:, j]) for j in (1, 2, 3)], axis=-1)
