import numpy as np
import pytest

from dosewise.evaluate.anesthesia.closed_loop import case_metrics
from dosewise.sim.anesthesia.cases import CaseTrajectories, sample_cases


def test_metrics_on_a_hand_made_case():
    cohort = sample_cases(1, np.random.default_rng(0))
    seconds = 1200  # 20 decision steps of 60 s
    bis = np.full((seconds, 1), 50.0, dtype=np.float32)
    bis[:90] = 90.0  # awake for 90 s
    bis[90:200] = 35.0  # overshoot: nadir 35 during induction
    bis[900:960] = 70.0  # one light minute in maintenance (of 300 s after induction)
    mean_ap = np.full((seconds, 1), 80.0, dtype=np.float32)
    mean_ap[:120] = 60.0  # 2 hypotensive minutes out of 20
    rates = np.zeros((20, 1, 2), dtype=np.int64)
    rates[:, 0, 0] = 30  # 30 mL/h propofol = 600 mg/h
    traj = CaseTrajectories(vitals=np.zeros((20, 1, 5)), rates=rates, bis_true=bis, map_true=mean_ap, steps=np.array([20]), step_s=60)
    m = case_metrics(traj, cohort)
    assert m["time_to_bis_60_s"][0] == 90
    assert m["bis_nadir"][0] == 35.0 and m["undershoot"][0] == 5.0
    assert m["pct_bis_40_60"][0] == pytest.approx(100 * (600 - 60) / 600)
    assert m["pct_map_below_65"][0] == pytest.approx(10.0)
    assert m["map_median_maintenance"][0] == pytest.approx(80.0)
    assert m["propofol_mg_kg_h"][0] == pytest.approx(600 / cohort.covariates.weight[0])
    assert m["remifentanil_ug_kg_min"][0] == 0.0


def test_performance_errors_of_varvel():
    from dosewise.evaluate.anesthesia.closed_loop import performance_errors

    # Case 0: BIS 40, 50, 60, 70 -> PE -20, 0, 20, 40: MDPE 10, MDAPE 20, wobble median(|-30|, 10, 10, 30) = 20.
    # Case 1: always 55 -> PE 10 everywhere: MDPE = MDAPE = 10, wobble 0; its last second is masked out.
    bis = np.array([[40.0, 55.0], [50.0, 55.0], [60.0, 55.0], [70.0, 200.0]])
    mask = np.array([[True, True], [True, True], [True, True], [True, False]])
    errors = performance_errors(bis, mask)
    np.testing.assert_allclose(errors["mdpe"], [10.0, 10.0])
    np.testing.assert_allclose(errors["mdape"], [20.0, 10.0])
    np.testing.assert_allclose(errors["wobble"], [20.0, 0.0])
    # A case without a masked second has no errors (NaN), not a warning.
    none = performance_errors(bis, np.zeros_like(mask))
    assert np.isnan(none["mdpe"]).all()
