"""The sigmoid Emax (Hill) shape shared by the covariate maturation terms and the PD models."""

import numpy as np


def hill(x: np.ndarray, c50, gamma) -> np.ndarray:
    """x^gamma / (c50^gamma + x^gamma), elementwise; 0 at x = 0, 1/2 at x = c50."""
    xg = np.power(x, gamma)
    return xg / (np.power(c50, gamma) + xg)
