"""The simulated clinician (behaviour policy) and the CSV-like dataset it produces."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from dosewise.sim.vancomycin import DOSE_FEATURES, FEATURES, sample_cohort
from dosewise.sim.vancomycin_clinician import VancomycinClinician, simulate_dataset

COLUMNS = ["patient_id", "time", *FEATURES, *DOSE_FEATURES, "sex", "loading_dose_mg", "action", "reward"]
N = 3000


def _cohort(n: int = N, seed: int = 0, serious: bool | None = None):
    cohort = sample_cohort(n, np.random.default_rng(seed))
    if serious is not None:
        cohort = replace(cohort, serious=np.full(n, serious))
    return cohort


def _obs(level: float, creatinine: float = 1.0, n: int = N) -> np.ndarray:
    obs = np.tile([15.0, 1.0, 8.0, 15.0, 37.0, 120.0, 80.0], (n, 1))
    obs[:, 0], obs[:, 1] = level, creatinine
    return obs


def _on_grid(actions: np.ndarray, step: float = 0.05) -> bool:
    return bool(np.allclose(actions / step, np.round(actions / step), atol=1e-9))


@pytest.fixture(scope="module")
def dataset() -> pd.DataFrame:
    return simulate_dataset(150, seed=0)


# -- the policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1.0, 3.0, 12.5, 17.5, 40.0, 120.0])
def test_actions_bounded_and_on_the_chart_grid(level):
    clinician = VancomycinClinician(_cohort(), seed=1)
    for creatinine in (1.0, 3.0):  # the second call also triggers the creatinine alarm
        a = clinician(_obs(level, creatinine))
        assert a.shape == (N,)
        assert np.all((a >= -1.0) & (a <= 1.0))
        assert _on_grid(a)


def test_high_level_cuts_low_level_raises():
    cohort = _cohort()
    high = VancomycinClinician(cohort, seed=2)(_obs(40.0))
    low = VancomycinClinician(cohort, seed=2)(_obs(3.0))
    # Level 40: the band is exceeded by 20-25 mg/L, so the protocol cut is -1 after clipping,
    # except for inertia (25 %), noise and off-protocol decisions (8 %).
    assert high.mean() < -0.5 and (high < 0).mean() > 0.6
    assert (high == -1.0).mean() > 0.5
    assert low.mean() > 0.5 and (low > 0).mean() > 0.6
    # Inertia: about a quarter of the out-of-range levels are left alone (noise only).
    assert 0.15 < (np.abs(high) <= 0.2).mean() < 0.4


def test_in_band_level_keeps_the_regimen_on_average():
    non_serious = VancomycinClinician(_cohort(serious=False), seed=3)(_obs(12.5))
    serious = VancomycinClinician(_cohort(serious=True), seed=3)(_obs(17.5))
    for a in (non_serious, serious):
        assert abs(a.mean()) < 0.05
        assert (np.abs(a) <= 0.2).mean() > 0.85
    # A level of 17.5 is inside the serious band (15-20) but above the usual one (10-15).
    above = VancomycinClinician(_cohort(serious=False), seed=3)(_obs(17.5))
    assert above.mean() < -0.3


def test_serious_infections_aim_higher():
    level = 13.0  # in the 10-15 band, below the 15-20 band
    a_non = VancomycinClinician(_cohort(serious=False), seed=4)(_obs(level))
    a_ser = VancomycinClinician(_cohort(serious=True), seed=4)(_obs(level))
    assert abs(a_non.mean()) < 0.05
    assert a_ser.mean() > 0.3


def test_rising_creatinine_prompts_a_cut():
    clinician = VancomycinClinician(_cohort(serious=False), seed=5)
    first = clinician(_obs(12.5, creatinine=1.0))
    second = clinician(_obs(12.5, creatinine=2.0))  # 2x the first creatinine: alarm
    assert abs(first.mean()) < 0.05
    # Half respond with -0.4 (minus off-protocol decisions): about -0.18 on average.
    assert -0.3 < second.mean() < -0.1
    assert 0.35 < (second <= -0.25).mean() < 0.6


def test_reaction_delay_uses_the_previous_level():
    clinician = VancomycinClinician(_cohort(serious=False), seed=6)
    clinician(_obs(40.0))
    after = clinician(_obs(12.5))  # now in band, but 30 % still act on the old level of 40
    assert 0.15 < (after <= -0.7).mean() < 0.35
    assert after.mean() < -0.1


def test_clinician_is_seeded():
    cohort = _cohort(200)
    a = [VancomycinClinician(cohort, seed=7)(_obs(v, n=200)) for v in (30.0, 30.0)]
    b = VancomycinClinician(cohort, seed=8)(_obs(30.0, n=200))
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)


# -- the dataset -------------------------------------------------------------------------------


def test_dataset_columns_and_size(dataset):
    assert list(dataset.columns) == COLUMNS
    assert 1700 <= len(dataset) <= 2500
    assert dataset["patient_id"].nunique() == 150
    assert dataset["patient_id"].iloc[0] == "V0001"
    assert set(dataset["patient_id"]) == {f"V{i:04d}" for i in range(1, 151)}
    for name in [*FEATURES, "time", "action", "reward"]:
        assert pd.api.types.is_numeric_dtype(dataset[name]), name


def test_dataset_time_grid_and_episode_lengths(dataset):
    for _, g in dataset.groupby("patient_id", sort=False):
        times = g["time"].to_numpy()
        np.testing.assert_array_equal(times, 4 * np.arange(len(times)))
        assert 8 <= len(times) <= 20
    # Rows are sorted by patient, then time.
    assert dataset["patient_id"].is_monotonic_increasing


def test_dataset_missing_values_are_rare(dataset):
    features = dataset[list(FEATURES)]
    rows_with_nan = features.isna().any(axis=1).mean()
    assert 0.0 < rows_with_nan < 0.02
    for name in ("patient_id", "time", "action", "reward"):
        assert dataset[name].notna().all(), name


def test_dataset_values_are_plausible(dataset):
    assert dataset["vanco_level"].min() >= 2.0  # the LLOQ
    assert 5.0 < dataset["vanco_level"].median() < 40.0
    assert dataset["creatinine"].min() > 0.0 and dataset["creatinine"].max() < 15.0  # up to ESRD values on dialysis
    assert dataset["temperature"].dropna().between(35.0, 41.0).all()
    assert dataset["reward"].between(-14.0, 1.0).all()
    assert (dataset["reward"] == 1.0).mean() > 0.1  # some in-target steps
    assert (dataset["reward"] <= -9.0).sum() >= 1  # some AKI steps in 150 patients


def test_dataset_actions_cover_both_signs(dataset):
    a = dataset["action"].to_numpy()
    assert np.all((a >= -1.0) & (a <= 1.0))
    assert _on_grid(a)
    assert a.min() <= -0.8 and a.max() >= 0.8
    assert (a > 0).mean() > 0.1 and (a < 0).mean() > 0.1
    assert 0.03 < (a == 0).mean() < 0.8
    assert len(np.unique(a)) >= 25


def test_dataset_is_reproducible(dataset):
    pd.testing.assert_frame_equal(simulate_dataset(150, seed=0), dataset)
    other = simulate_dataset(150, seed=1)
    assert not other.equals(dataset)
    # Another seed is another cohort: other episode lengths, other first levels.
    first = lambda frame: frame.groupby("patient_id")["vanco_level"].first().to_numpy()
    assert not np.allclose(first(other), first(dataset), equal_nan=True)


def test_dataset_ids_are_zero_padded_to_four_digits():
    small = simulate_dataset(3, seed=2)
    assert set(small["patient_id"]) == {"V0001", "V0002", "V0003"}
    assert list(small.columns) == COLUMNS
