"""Measurement noise as PAS models it: coloured noise on BIS, white noise on MAP and CO.

BIS noise is white noise (SD 3) through H(s) = (0.1 s + 1) / (s^2 / w^2 + 2 xi s / w + 1), xi 0.2,
peak at 0.03 Hz, discretised with a zero-order hold like the PK; MAP SD 5 mmHg, CO SD 0.1 L/min.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dosewise.sim.linalg import expm_batched

BIS_WHITE_SD = 3.0
MAP_SD = 5.0  # mmHg
CO_SD = 0.1  # L/min
XI = 0.2
PEAK_HZ = 0.03


@dataclass(frozen=True)
class BISNoiseFilter:
    """Discrete state-space (controllable canonical form) of the BIS noise filter."""

    phi: np.ndarray  # [2, 2]
    gamma: np.ndarray  # [2]
    c: np.ndarray  # [2]

    @classmethod
    def build(cls, dt: float) -> BISNoiseFilter:
        omega = 2.0 * np.pi * PEAK_HZ / np.sqrt(1.0 - 2.0 * XI**2)  # rad/s
        # H(s) = w^2 (0.1 s + 1) / (s^2 + 2 xi w s + w^2)
        a = np.array([[0.0, 1.0], [-(omega**2), -2.0 * XI * omega]])
        aug = np.zeros((1, 3, 3))
        aug[0, :2, :2] = a
        aug[0, 1, 2] = 1.0
        prop = expm_batched(aug * dt)[0]
        return cls(phi=prop[:2, :2], gamma=prop[:2, 2], c=np.array([omega**2, 0.1 * omega**2]))


class MeasurementNoise:
    """Per-patient noise generator; the BIS filter keeps its own state [N, 2]."""

    def __init__(self, n: int, dt: float, rng: np.random.Generator):
        self.filter = BISNoiseFilter.build(dt)
        self.rng = rng
        self.state = np.zeros((n, 2))  # [N, 2]

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Additive noise on (BIS, MAP, CO), each [N], for one step."""
        n = self.state.shape[0]
        white = self.rng.normal(0.0, BIS_WHITE_SD, n)
        self.state = self.state @ self.filter.phi.T + white[:, None] * self.filter.gamma
        return self.state @ self.filter.c, self.rng.normal(0.0, MAP_SD, n), self.rng.normal(0.0, CO_SD, n)
