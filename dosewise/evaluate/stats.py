"""Confidence intervals by resampling patients: the unit that is independent in clinical data."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CI_LEVEL = 0.95


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampled row indices; share them across statistics to get paired intervals."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], indices: np.ndarray, point: float) -> dict:
    """Percentile interval of ``statistic`` (rows -> one value per resample) at CI_LEVEL.

    ``statistic`` receives the [n_boot, n] index matrix and must return [n_boot] values.
    """
    values = statistic(indices)
    alpha = (1.0 - CI_LEVEL) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return {"mean": float(point), "ci95": [float(low), float(high)]}
