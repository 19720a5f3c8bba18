"""Patient covariates of a batch of N patients, validated once, as the PK models expect them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Covariates:
    """Covariates of N patients; every field is a float array of shape [N]."""

    age: np.ndarray  # [N] years
    height: np.ndarray  # [N] cm
    weight: np.ndarray  # [N] kg
    sex: np.ndarray  # [N] 1 = male, 0 = female

    @classmethod
    def from_arrays(cls, age, height, weight, sex) -> Covariates:
        """Broadcast scalars, check shapes and ranges, and freeze copies of the arrays."""
        arrays = [np.atleast_1d(np.asarray(a, dtype=float)) for a in (age, height, weight, sex)]
        if any(a.ndim != 1 for a in arrays):
            raise ValueError("age, height, weight and sex must be scalars or 1-D arrays of N patients")
        try:
            arrays = [a.copy() for a in np.broadcast_arrays(*arrays)]
        except ValueError as err:
            raise ValueError(f"age, height, weight and sex have mismatched shapes {[a.shape for a in arrays]}") from err
        age, height, weight, sex = arrays
        if not all(np.isfinite(a).all() for a in arrays):
            raise ValueError("covariates must be finite")
        if (age <= 0).any() or (height <= 0).any() or (weight <= 0).any():
            raise ValueError("age, height and weight must be positive")
        if not np.isin(sex, (0.0, 1.0)).all():
            raise ValueError("sex must be 1 (male) or 0 (female)")
        for a in arrays:
            a.flags.writeable = False
        return cls(age, height, weight, sex)

    @property
    def n(self) -> int:
        return self.age.shape[0]

    @property
    def lbm(self) -> np.ndarray:
        """Lean body mass [N] kg, James (1976) formula as PAS and the Schnider/Minto papers use it."""
        ratio = (self.weight / self.height) ** 2
        male = 1.1 * self.weight - 128.0 * ratio
        female = 1.07 * self.weight - 148.0 * ratio
        return np.where(self.sex == 1.0, male, female)

    @property
    def bmi(self) -> np.ndarray:
        """Body-mass index [N] kg/m^2."""
        return self.weight / (self.height / 100.0) ** 2


def al_sallami_ffm(sex: np.ndarray, weight: np.ndarray, age: np.ndarray, bmi: np.ndarray) -> np.ndarray:
    """Fat-free mass [N] kg (Al-Sallami et al. 2015, Clin Pharmacokinet 54:1183), used by both Eleveld models."""
    male = (0.88 + 0.12 / (1.0 + (age / 13.4) ** -12.7)) * 9270.0 * weight / (6680.0 + 216.0 * bmi)
    female = (1.11 - 0.11 / (1.0 + (age / 7.1) ** -1.1)) * 9270.0 * weight / (8780.0 + 244.0 * bmi)
    return np.where(sex == 1.0, male, female)
