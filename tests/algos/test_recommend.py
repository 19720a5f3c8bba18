"""Recommendation for one patient: parsing a typed-in state, and the numbers and caveats returned."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.iql import IQLConfig
from dosewise.algos.recommend import (
    GREEDY_DISAGREEMENT,
    Recommendation,
    StateError,
    dose_for_action,
    parse_state,
    recommend,
    validate_state,
)
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql
from dosewise.data.schema import DataConfig
from dosewise.data.transitions import Transitions

NAMES = ("vanco_level", "creatinine")
IN_RANGE = {"vanco_level": 20.0, "creatinine": 1.0}


def _transitions(n: int = 600, seed: int = 0) -> Transitions:
    """One-step episodes; the best action lowers the dose when the level is high."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(5.0, 40.0, n)
    creat = rng.uniform(0.1, 2.0, n)
    creat[0], creat[1] = 0.1, 2.0  # exact bounds of the training range, as a data file would hold them
    obs = np.stack([level, creat], axis=1).astype(np.float32)
    action = rng.uniform(-1.0, 1.0, n)
    best = np.clip((20.0 - level) / 20.0, -1.0, 1.0)
    reward = 1.0 - 2.0 * (action - best) ** 2
    return Transitions(
        observations=obs,
        actions=action.reshape(n, 1).astype(np.float32),
        rewards=reward.astype(np.float32),
        next_observations=obs,
        dones=np.ones(n, dtype=np.float32),
        patient_ids=np.array([f"p{i}" for i in range(n)], dtype=object),
        times=np.zeros(n),
        episode_starts=np.ones(n, dtype=bool),
        feature_names=NAMES,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> TrainedIQL:
    run = IQLRunConfig(
        data=DataConfig(features=NAMES),
        iql=IQLConfig(lr=3e-3, hidden=(32, 32), batch_size=64, beta=3.0, polyak=0.05),
        train=TrainConfig(steps=300, checkpoint_every=0, log_every=100, seed=0),
    )
    out = tmp_path_factory.mktemp("recommend_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and unaffected by other load
    try:
        train_iql(run, _transitions(), out, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return TrainedIQL.load(out)


# -- parse_state ----------------------------------------------------------------------------------


def test_parse_state_returns_floats_in_model_order() -> None:
    state = parse_state([" creatinine = 1.25", "vanco_level=18.5"], NAMES)
    assert state == {"vanco_level": 18.5, "creatinine": 1.25}
    assert list(state) == list(NAMES)
    assert all(type(v) is float for v in state.values())
    assert parse_state(["vanco_level=-0", "creatinine=1e-1"], NAMES) == {"vanco_level": 0.0, "creatinine": 0.1}


@pytest.mark.parametrize(
    ("pairs", "feature", "words"),
    [
        (["vanco_level=20"], "creatinine", "missing"),
        (["vanco_level=20", "creatinine=1", "weight=70"], "weight", "unknown"),
        (["vanco_level=20", "creatinine=high"], "creatinine", "not a number"),
        (["vanco_level=20", "creatinine="], "creatinine", "not a number"),
        (["vanco_level=inf", "creatinine=1"], "vanco_level", "finite"),
        (["vanco_level=-inf", "creatinine=1"], "vanco_level", "finite"),
        (["vanco_level=nan", "creatinine=1"], "vanco_level", "finite"),
        (["vanco_level=20", "creatinine 1.0"], "creatinine", "name=value"),
        (["vanco_level=20", "creatinine=1", "creatinine=2"], "creatinine", "twice"),
        (["vanco_level=20", "creatinine=1", " creatinine =2"], "creatinine", "twice"),
    ],
)
def test_parse_state_errors_name_the_feature(pairs: list[str], feature: str, words: str) -> None:
    with pytest.raises(StateError) as err:
        parse_state(pairs, NAMES)
    message = str(err.value)
    assert feature in message
    assert words in message


def test_validate_state_rejects_values_that_are_not_numbers() -> None:
    with pytest.raises(StateError, match="'creatinine'"):
        validate_state({"vanco_level": 20.0, "creatinine": None}, NAMES)
    with pytest.raises(StateError, match="'vanco_level'"):
        validate_state({"vanco_level": [20.0], "creatinine": 1.0}, NAMES)
    assert validate_state({"vanco_level": "20", "creatinine": np.float32(1.5)}, NAMES) == {"vanco_level": 20.0, "creatinine": 1.5}


# -- recommend ------------------------------------------------------------------------------------


def _range_warnings(rec: Recommendation) -> list[str]:
    return [w for w in rec.warnings if "outside the training range" in w]


def test_recommendation_numbers_agree_with_the_model(model: TrainedIQL) -> None:
    rec = recommend(model, IN_RANGE)
    obs = np.array([[IN_RANGE[k] for k in NAMES]], dtype=np.float32)

    assert rec.state == IN_RANGE
    assert -1.0 <= rec.policy_action <= 1.0
    assert rec.policy_action == pytest.approx(float(model.policy_action(obs)[0]), abs=0)

    assert len(rec.q_curve) == 101
    actions = np.array([a for a, _ in rec.q_curve])
    values = np.array([q for _, q in rec.q_curve])
    np.testing.assert_array_equal(actions, model.action_grid())
    np.testing.assert_array_equal(values, model.q_curve(obs)[0])
    assert rec.greedy_action == actions[values.argmax()]
    assert rec.greedy_q_value == values.max()

    assert rec.q_value == float(model.q_value(obs, np.array([rec.policy_action]))[0])
    assert math.isfinite(rec.q_value)


def test_recommendation_has_learned_the_dosing_rule(model: TrainedIQL) -> None:
    low = recommend(model, {"vanco_level": 8.0, "creatinine": 1.0})
    high = recommend(model, {"vanco_level": 36.0, "creatinine": 1.0})
    assert low.policy_action > 0.2 and high.policy_action < -0.2  # raise the dose when low, lower it when high
    assert low.greedy_action > high.greedy_action


def test_in_range_state_has_no_range_warning(model: TrainedIQL) -> None:
    assert _range_warnings(recommend(model, IN_RANGE)) == []
    lo, hi = model.feature_ranges["vanco_level"]
    assert _range_warnings(recommend(model, {"vanco_level": lo, "creatinine": 1.0})) == []
    assert _range_warnings(recommend(model, {"vanco_level": hi, "creatinine": 1.0})) == []


@pytest.mark.parametrize(
    ("state", "feature"),
    [
        ({"vanco_level": 60.0, "creatinine": 1.0}, "vanco_level"),
        ({"vanco_level": 1.0, "creatinine": 1.0}, "vanco_level"),
        ({"vanco_level": 20.0, "creatinine": 5.0}, "creatinine"),
    ],
)
def test_out_of_range_value_warns_with_the_feature_name(model: TrainedIQL, state: dict, feature: str) -> None:
    warnings = _range_warnings(recommend(model, state))
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{feature} = {state[feature]:g} ")
    lo, hi = model.feature_ranges[feature]
    assert f"[{lo:g}, {hi:g}]" in warnings[0]


def test_two_out_of_range_values_give_two_warnings(model: TrainedIQL) -> None:
    warnings = _range_warnings(recommend(model, {"vanco_level": 100.0, "creatinine": 9.0}))
    assert [w.split(" ")[0] for w in warnings] == ["vanco_level", "creatinine"]


def test_training_minimum_as_written_in_the_data_is_in_range(model: TrainedIQL) -> None:
    assert _range_warnings(recommend(model, {"vanco_level": 20.0, "creatinine": 0.1})) == []


def test_greedy_disagreement_warning_matches_the_gap(model: TrainedIQL) -> None:
    for level in (6.0, 12.0, 20.0, 28.0, 38.0):
        rec = recommend(model, {"vanco_level": level, "creatinine": 1.0})
        far = abs(rec.greedy_action - rec.policy_action) > GREEDY_DISAGREEMENT
        assert any("greedy action" in w for w in rec.warnings) == far


def test_greedy_far_from_policy_earns_a_warning(model: TrainedIQL, monkeypatch: pytest.MonkeyPatch) -> None:
    """A critic that peaks at the lowest dose while the policy raises it: the caveat must be shown."""
    state = {"vanco_level": 6.0, "creatinine": 1.0}
    policy = recommend(model, state).policy_action
    assert policy > 0.2

    def peaked_low(obs, grid=None):
        grid = model.action_grid() if grid is None else grid
        return np.tile(-((grid + 1.0) ** 2), (len(np.atleast_2d(obs)), 1)).astype(np.float32)

    monkeypatch.setattr(model, "q_curve", peaked_low)
    rec = recommend(model, state)
    assert rec.greedy_action == -1.0 and rec.greedy_q_value == 0.0
    assert rec.policy_action == policy
    far = [w for w in rec.warnings if "greedy action" in w]
    assert len(far) == 1
    assert f"{-1.0:+.2f}" in far[0] and f"{policy:+.2f}" in far[0] and "prefer the policy's action" in far[0]
    assert _range_warnings(rec) == []


def test_recommend_validates_the_state(model: TrainedIQL) -> None:
    with pytest.raises(StateError, match="creatinine"):
        recommend(model, {"vanco_level": 20.0})
    with pytest.raises(StateError, match="weight"):
        recommend(model, {**IN_RANGE, "weight": 70.0})
    with pytest.raises(StateError, match="vanco_level"):
        recommend(model, {"vanco_level": float("inf"), "creatinine": 1.0})


def test_to_dict_is_json_serialisable(model: TrainedIQL) -> None:
    rec = recommend(model, {"vanco_level": 60.0, "creatinine": 1.0})
    data = json.loads(json.dumps(rec.to_dict()))
    assert set(data) == {
        *("state", "policy_action", "greedy_action", "q_value", "greedy_q_value", "q_curve", "warnings", "overrides"),
        *("dose_mg", "interval_h", "current_dose_mg", "predicted_auc24", "predicted_trough", "levels_used", "prediction_from_h", "notes"),
    }
    assert data["dose_mg"] is None and data["interval_h"] is None and data["predicted_auc24"] is None
    assert len(data["notes"]) == 1 and "no dose column" in data["notes"][0]
    assert data["overrides"] == []
    assert data["state"] == {"vanco_level": 60.0, "creatinine": 1.0}
    assert data["policy_action"] == rec.policy_action
    assert len(data["q_curve"]) == 101 and all(len(pair) == 2 for pair in data["q_curve"])
    assert data["q_curve"][0][0] == -1.0 and data["q_curve"][-1][0] == 1.0
    assert any("vanco_level" in w for w in data["warnings"])


# -- the action in mg, and the exposure predicted from the patient's history ----------------------


@pytest.mark.parametrize(
    ("action", "current", "expected"),
    [
        (0.4, 1000.0, 1200.0),
        (-1.0, 1000.0, 500.0),
        (1.0, 1000.0, 1500.0),
        (0.0, 750.0, 750.0),
        (-1.0, 200.0, 125.0),
        (1.0, 3000.0, 4000.0),
        (3.0, 1000.0, 1500.0),
    ],
)
def test_dose_for_action_is_the_simulators_dose_rule(action: float, current: float, expected: float) -> None:
    assert dose_for_action(action, current) == pytest.approx(expected)


def test_dose_for_action_refuses_a_non_finite_action() -> None:
    with pytest.raises(StateError, match="finite action"):
        dose_for_action(float("nan"), 1000.0)


@pytest.fixture(scope="module")
def dose_aware(tmp_path_factory: pytest.TempPathFactory):
    """A small run on simulated dose-aware data, and that data's table."""
    from dosewise.data import load_table
    from dosewise.data.transitions import build_transitions
    from dosewise.sim.vancomycin import CohortSpec, VancomycinConfig
    from dosewise.sim.vancomycin_clinician import simulate_dataset

    table = simulate_dataset(20, 3, VancomycinConfig(cohort=CohortSpec(missing_prob=0.0)))
    folder = tmp_path_factory.mktemp("dose_aware")
    table.to_csv(folder / "v.csv", index=False)
    run = IQLRunConfig(iql=IQLConfig(hidden=(16, 16), batch_size=64), train=TrainConfig(steps=40, checkpoint_every=0, log_every=20, seed=0))
    frame, _ = load_table(folder / "v.csv", run.data)
    from dosewise.algos.training import record_found_features

    transitions = build_transitions(frame, run.data)
    run = record_found_features(run, transitions.feature_names)
    train_iql(run, transitions, folder / "run")
    return TrainedIQL.load(folder / "run"), table


def test_history_prediction_is_map_estimate_and_predict(dose_aware) -> None:
    from dosewise.algos.bayesian_dosing import map_estimate, predict
    from dosewise.algos.dosing_history import dosing_record, next_administration_h
    from dosewise.algos.recommend import history_state, load_history

    model, table = dose_aware
    rows = load_history(table[table["patient_id"] == "V0004"], model.data_config)
    rec = recommend(model, history_state(rows, model.feature_names), history=rows)
    state = rows.iloc[-1]
    assert rec.current_dose_mg == state["dose_mg"] and rec.interval_h == state["interval_h"]
    assert rec.dose_mg == pytest.approx(dose_for_action(rec.policy_action, state["dose_mg"]))
    record = dosing_record(rows, model.data_config)
    estimate = map_estimate([record])
    first = next_administration_h(rows, model.data_config)
    direct = predict(estimate, [record], np.array([rec.dose_mg]), np.array([rec.interval_h]), np.array([first]))
    assert rec.predicted_auc24 == pytest.approx(float(direct.auc24[0]), rel=1e-12)
    assert rec.predicted_trough == pytest.approx(float(direct.trough[0]), rel=1e-12)
    assert rec.levels_used == int(np.isfinite(rows["vanco_level"]).sum()) == len(rows) and rec.prediction_from_h == first
    assert rec.notes == []
    outside = not 400.0 <= rec.predicted_auc24 <= 600.0
    assert outside == any(w.startswith("predicted AUC24") for w in rec.warnings)
    assert (rec.predicted_trough > 20.0) == any(w.startswith("predicted trough") for w in rec.warnings)


def test_a_state_alone_gives_the_dose_but_no_prediction(dose_aware) -> None:
    from dosewise.algos.recommend import NEEDS_HISTORY

    model, table = dose_aware
    state = {name: float(table[name].iloc[3]) for name in model.feature_names}
    rec = recommend(model, state)
    assert rec.dose_mg == pytest.approx(dose_for_action(rec.policy_action, state["dose_mg"]))
    assert rec.predicted_auc24 is None and rec.predicted_trough is None and rec.levels_used is None
    assert rec.notes == [NEEDS_HISTORY]


def test_exposure_warnings_name_the_number_and_the_target() -> None:
    from dosewise.algos.recommend import HistoryPrediction, exposure_warnings

    assert exposure_warnings(HistoryPrediction(500.0, 15.0, 3, 12.0), 1000.0, 12.0) == []
    low, toxic = exposure_warnings(HistoryPrediction(350.0, 22.5, 3, 12.0), 1250.0, 12.0)
    assert "AUC24 350 mg*h/L" in low and "1,250 mg every 12 h" in low and "400-600" in low
    assert "trough 22.5 mg/L" in toxic and "above 20 mg/L" in toxic
