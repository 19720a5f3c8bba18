"""The dosing record rebuilt from table rows is the simulator's own record of what was given."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from dosewise.algos.bayesian_dosing import map_estimate
from dosewise.algos.dosing_history import administrations, dosing_record, dosing_records, next_administration_h
from dosewise.data import load_table
from dosewise.data.loading import DataError
from dosewise.data.schema import DataConfig
from dosewise.sim.vancomycin import CohortSpec, VancomycinConfig, rollout, sample_cohort
from dosewise.sim.vancomycin_clinician import VancomycinClinician, simulate_dataset

NO_MISSING = VancomycinConfig(cohort=CohortSpec(missing_prob=0.0))


def _dataset_and_truth(n: int, seed: int):
    """simulate_dataset's table and the rollout behind it (the same seeds), for its administrations."""
    frame = simulate_dataset(n, seed, NO_MISSING)
    seeds = np.random.SeedSequence(seed).spawn(3)
    cohort = sample_cohort(n, np.random.default_rng(seeds[0]), NO_MISSING)
    clinician = VancomycinClinician(cohort, int(seeds[1].generate_state(1)[0]))
    traj = rollout(cohort, clinician, int(seeds[2].generate_state(1)[0]), NO_MISSING)
    return frame, cohort, traj


def test_rebuilt_administrations_equal_the_simulators(tmp_path):
    frame, cohort, traj = _dataset_and_truth(120, 5)
    frame.to_csv(tmp_path / "v.csv", index=False)
    loaded, report = load_table(tmp_path / "v.csv", DataConfig())
    assert report.rows_dropped_nan == 0
    records = dosing_records(loaded)
    assert len(records) == 120
    for patient, record in records.items():
        i = int(patient[1:]) - 1
        truth = traj.administrations[i].copy()
        truth[:, 0] -= 4.0  # table time = simulator hour - 4
        truth = truth[truth[:, 0] < 4.0 * (cohort.steps[i] - 1)]  # given before the last row's decision
        rebuilt = np.stack([record.dose_start_h, record.dose_mg, record.infusion_h], axis=1)
        np.testing.assert_allclose(rebuilt, truth, rtol=0, atol=1e-6, err_msg=patient)
        assert record.male == bool(cohort.sex[i]) and record.dialysis == bool(cohort.dialysis[i])
        assert record.weight_kg == pytest.approx(cohort.weight[i])
    # Serious infections got a loading dose larger than the regimen: the rebuilt first dose is it.
    loaded_patients = [p for p, r in records.items() if cohort.serious[int(p[1:]) - 1] and not r.dialysis]
    assert loaded_patients and all(records[p].dose_mg[0] == cohort.loading_mg[int(p[1:]) - 1] for p in loaded_patients)


def test_map_from_the_table_equals_map_from_the_chart(tmp_path):
    """The same patient estimated from the table rows and from the simulator's administrations gives the same PK."""
    frame, _, traj = _dataset_and_truth(40, 2)
    records = dosing_records(frame)
    from_table = map_estimate(list(records.values()))
    direct = []
    for patient, record in records.items():
        i = int(patient[1:]) - 1
        truth = traj.administrations[i].copy()
        truth[:, 0] -= 4.0
        truth = truth[truth[:, 0] < record.sample_h.max()]
        direct.append(dataclasses.replace(record, dose_start_h=truth[:, 0], dose_mg=truth[:, 1], infusion_h=truth[:, 2]))
    np.testing.assert_allclose(from_table.cl_l_h, map_estimate(direct).cl_l_h, rtol=1e-8)


def test_an_interval_longer_than_the_row_spacing_and_an_overdue_dose():
    rows = pd.DataFrame(
        {
            "patient_id": "P1",
            "time": [0.0, 4.0, 8.0, 12.0, 16.0],
            "vanco_level": [30.0, 22.0, 17.0, 35.0, 28.0],
            "creatinine": [1.0, 1.0, 1.1, 1.1, 1.2],
            "dose_mg": [1000.0, 1000.0, 1500.0, 1500.0, 1500.0],
            "interval_h": 12.0,
            "hours_since_dose": [4.0, 8.0, 12.0, 4.0, 8.0],
            "weight_kg": 70.0,
            "age": 50.0,
            "dialysis": 0,
            "sex": 1,
            "loading_dose_mg": 2000.0,
        }
    )
    given = administrations(rows)
    # -4 h: the loading dose; 8 h: the regimen decided at the 4 h row (the 8 h row's dose_mg).
    np.testing.assert_array_equal(given, [[-4.0, 2000.0, 2.0], [8.0, 1500.0, 2.0]])
    assert next_administration_h(rows) == 20.0
    record = dosing_record(rows)
    assert record.creatinine == 1.2 and record.creatinine_baseline == 1.0
    np.testing.assert_array_equal(record.sample_h, rows["time"])
    overdue = rows.assign(hours_since_dose=[4.0, 8.0, 12.0, 16.0, 20.0])
    assert next_administration_h(overdue) == 16.0


def test_missing_columns_are_named():
    rows = pd.DataFrame({"patient_id": ["P1"], "time": [0.0], "vanco_level": [10.0], "creatinine": [1.0], "dose_mg": [1000.0]})
    with pytest.raises(DataError, match=r"interval_h, hours_since_dose, weight_kg, age, dialysis, sex"):
        dosing_record(rows, source="history.csv")
