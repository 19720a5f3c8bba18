"""Windows decide what the planner sees before a decision and what it must
predict after it; these tests pin the layout (left padding, t+1 targets, case
boundaries) against hand-worked values and a slow per-window reference, and
the case split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dosewise.data import (
    AnesthesiaReward,
    WindowConfig,
    Windows,
    build_windows,
    split_by_case,
    split_case_ids,
)
from dosewise.data.anesthesia import COVARIATES, RATES, VITALS
from dosewise.data.windows import HISTORY_FEATURES, discounted_suffix_sums

REWARD = AnesthesiaReward()


def case_frame(case: str, steps: int, base: float, rate_base: int = 1, start: float = 0.0) -> pd.DataFrame:
    """A case whose values all lie in [base, base + 30) (vitals) and [rate_base, rate_base + 30) (rates)."""
    k = np.arange(steps)
    vitals = {name: base + 0.5 * j + k + 0.3 for j, name in enumerate(VITALS)}
    return pd.DataFrame(
        {
            "case_id": case,
            "time": start + 60.0 * k,
            **vitals,
            "PPF20_RATE": rate_base + k,
            "RFTN20_RATE": rate_base + 2 * k,
            "age": base,
            "sex": 1.0,
            "height": base + 1,
            "weight": base + 2,
            "asa": 3.0,
        }
    )


def two_cases() -> pd.DataFrame:
    # Disjoint ranges: case a lives in [10, 40) / rates [1, 31), case b in [60, 90) / rates [100, 130).
    return pd.concat([case_frame("b", 7, 60.0, 100), case_frame("a", 4, 10.0, 1)], ignore_index=True)


def reference_windows(frame: pd.DataFrame, config: WindowConfig, reward: AnesthesiaReward) -> dict[str, list]:
    """One window at a time, straight from the definitions."""
    out: dict[str, list] = {name: [] for name in ("history", "mask", "actions", "bis", "map", "rewards", "returns")}
    for _, rows in frame.sort_values(["case_id", "time"]).groupby("case_id", sort=True):
        vitals = rows[list(VITALS)].to_numpy(np.float64)
        rates = rows[list(RATES)].to_numpy(np.int64)
        steps = len(rows)
        previous = np.vstack([np.zeros((1, 2)), rates[:-1]])
        elapsed = rows["time"].to_numpy(np.float64) - rows["time"].min()
        observations = np.hstack([vitals, previous, (elapsed < config.induction_s)[:, None]])
        step_reward = [float(reward.reward(vitals[s + 1, 0], vitals[s + 1, 1])) for s in range(steps - 1)]
        for t in range(steps - 1):
            history = np.zeros((config.max_len, len(HISTORY_FEATURES)))
            mask = np.zeros(config.max_len, dtype=bool)
            for j in range(config.max_len):
                s = t - config.max_len + 1 + j
                if s >= 0:
                    history[j], mask[j] = observations[s], True
            actions = np.zeros((config.pre_len, 2), dtype=np.int64)
            bis = np.zeros(config.pre_len, dtype=np.int64)
            mean_pressure = np.zeros(config.pre_len, dtype=np.int64)
            rewards = np.zeros(config.pre_len)
            for k in range(config.pre_len):
                if t + k + 1 < steps:
                    actions[k] = rates[t + k]
                    bis[k] = min(max(int(np.floor(vitals[t + k + 1, 0] + 0.5)), 0), 100)
                    mean_pressure[k] = min(max(int(np.floor(vitals[t + k + 1, 1] + 0.5)), 0), 200)
                    rewards[k] = step_reward[t + k]
            value = sum(config.gamma ** (s - t) * step_reward[s] for s in range(t, steps - 1))
            for name, item in zip(out, (history, mask, actions, bis, mean_pressure, rewards, value)):
                out[name].append(item)
    return out


def test_shapes_dtypes_and_names() -> None:
    config = WindowConfig(max_len=3, pre_len=2)
    windows = build_windows(two_cases(), config)
    w = 3 + 6  # a case of T steps gives T - 1 windows
    assert len(windows) == w
    assert windows.history.shape == (w, 3, 8) and windows.history.dtype == np.float32
    assert windows.history_mask.shape == (w, 3) and windows.history_mask.dtype == bool
    assert windows.static.shape == (w, 5) and windows.static.dtype == np.float32
    assert windows.actions.shape == (w, 2, 2) and windows.actions.dtype == np.int64
    for array in (windows.target_bis, windows.target_map):
        assert array.shape == (w, 2) and array.dtype == np.int64
    assert windows.rewards.shape == (w, 2) and windows.rewards.dtype == np.float32
    assert windows.future_mask.shape == (w, 2) and windows.future_mask.dtype == bool
    assert windows.returns.shape == windows.times.shape == windows.case_ids.shape == (w,)
    assert windows.feature_names == ("BIS", "MAP", "SBP", "DBP", "HR", "prev_PPF20_RATE", "prev_RFTN20_RATE", "option")
    assert windows.static_names == COVARIATES and windows.action_names == RATES
    assert windows.case_ids.tolist() == ["a"] * 3 + ["b"] * 6
    assert windows.times.tolist() == [0.0, 60.0, 120.0, 0.0, 60.0, 120.0, 180.0, 240.0, 300.0]


def test_history_is_left_padded_and_first_window_has_one_real_step() -> None:
    windows = build_windows(two_cases(), WindowConfig(max_len=3, pre_len=2))
    np.testing.assert_array_equal(windows.history_mask[:3], [[False, False, True], [False, True, True], [True] * 3])
    np.testing.assert_array_equal(windows.history_mask[3], [False, False, True])  # first window of case b
    np.testing.assert_array_equal(windows.history[0, :2], 0.0)
    # Case a step 0: its vitals, and no rate before the case started.
    np.testing.assert_allclose(windows.history[0, 2], [10.3, 10.8, 11.3, 11.8, 12.3, 0.0, 0.0, 1.0], rtol=1e-6)
    # Case a step 2 (window 2): steps 0..2, each with the rates of the step before.
    np.testing.assert_allclose(windows.history[2, :, 0], [10.3, 11.3, 12.3], rtol=1e-6)
    np.testing.assert_array_equal(windows.history[2, :, 5:7], [[0, 0], [1, 1], [2, 3]])
    np.testing.assert_array_equal(windows.static[0], [10.0, 1.0, 11.0, 12.0, 3.0])


def test_option_flag_marks_the_induction_phase_of_each_case() -> None:
    # Steps are 60 s apart and each case starts at time 0: with induction_s 120 the flag is 1 on
    # steps 0 and 1 of every case, 0 later, and 0 on padding.
    windows = build_windows(two_cases(), WindowConfig(max_len=4, pre_len=1, induction_s=120.0))
    option = windows.history[..., windows.feature_names.index("option")]
    np.testing.assert_array_equal(option[2], [0, 1, 1, 0])  # case a, t = 2: padding, steps 0, 1, 2
    np.testing.assert_array_equal(option[8], [0, 0, 0, 0])  # case b, t = 5: steps 2..5
    off = build_windows(two_cases(), WindowConfig(max_len=4, pre_len=1, induction_s=0.0))
    assert not off.history[..., -1].any()


def test_actions_at_t_targets_at_t_plus_one_and_future_mask() -> None:
    windows = build_windows(two_cases(), WindowConfig(max_len=3, pre_len=2))
    # Window 1: case a, t = 1 -> actions at steps 1, 2; BIS at steps 2, 3 (12.3 -> 12, 13.3 -> 13).
    np.testing.assert_array_equal(windows.actions[1], [[2, 3], [3, 5]])
    np.testing.assert_array_equal(windows.target_bis[1], [12, 13])
    np.testing.assert_array_equal(windows.target_map[1], [13, 14])  # MAP 12.8, 13.8
    np.testing.assert_array_equal(windows.future_mask[1], [True, True])
    # Window 2: case a, t = 2 is the last window; only step 3 follows.
    np.testing.assert_array_equal(windows.future_mask[2], [True, False])
    np.testing.assert_array_equal(windows.actions[2], [[3, 5], [0, 0]])
    np.testing.assert_array_equal(windows.target_bis[2], [13, 0])
    assert windows.rewards[2, 1] == 0.0


def test_no_window_mixes_two_cases() -> None:
    windows = build_windows(two_cases(), WindowConfig(max_len=8, pre_len=4))
    vitals = {"a": (10.0, 40.0), "b": (60.0, 90.0)}
    rates = {"a": (1, 31), "b": (100, 130)}

    def inside(values: np.ndarray, bounds: tuple[float, float]) -> bool:
        return bool(((values >= bounds[0]) & (values < bounds[1])).all())

    for w, case in enumerate(windows.case_ids):
        real = windows.history[w][windows.history_mask[w]]
        assert inside(real[:, :5], vitals[case])
        assert (real[0, 5:7] == 0).all() or inside(real[0, 5:7], rates[case])  # 0 before the case's first step
        assert inside(real[1:, 5:7], rates[case])
        assert (windows.history[w][~windows.history_mask[w]] == 0).all()
        future = windows.future_mask[w]
        assert inside(windows.target_bis[w][future], vitals[case])
        assert inside(windows.target_map[w][future], vitals[case])
        assert inside(windows.actions[w][future], rates[case])
        assert windows.static[w, 0] == vitals[case][0]


def test_matches_a_per_window_reference() -> None:
    frame = pd.concat([case_frame("x", 12, 45.0, 5), case_frame("y", 3, 58.0, 50), case_frame("z", 1, 30.0, 7)], ignore_index=True)
    frame["MAP"] = 60.0 + np.arange(len(frame)) % 9  # around the hypotension threshold
    config = WindowConfig(max_len=5, pre_len=3, gamma=0.9)
    windows = build_windows(frame, config)
    expected = reference_windows(frame, config, REWARD)

    assert len(windows) == 11 + 2  # case z has a single step: no window
    np.testing.assert_allclose(windows.history, np.array(expected["history"]), rtol=1e-6)
    np.testing.assert_array_equal(windows.history_mask, expected["mask"])
    np.testing.assert_array_equal(windows.actions, expected["actions"])
    np.testing.assert_array_equal(windows.target_bis, expected["bis"])
    np.testing.assert_array_equal(windows.target_map, expected["map"])
    np.testing.assert_allclose(windows.rewards, expected["rewards"], rtol=1e-6)
    np.testing.assert_allclose(windows.returns, expected["returns"], rtol=1e-5)


def test_returns_equal_a_hand_computed_discounted_sum() -> None:
    frame = case_frame("a", 4, 50.0)
    frame["BIS"] = [50.0, 50.0, 30.0, 50.0]
    frame["MAP"] = [80.0, 80.0, 80.0, 60.0]
    windows = build_windows(frame, WindowConfig(max_len=2, pre_len=2, gamma=0.5))
    # Rewards of reaching steps 1, 2, 3: (50, 80) -> 1, (30, 80) -> -0.5, (50, 60) -> 1 - 2 - 0.25.
    np.testing.assert_allclose(windows.rewards, [[1.0, -0.5], [-0.5, -1.25], [-1.25, 0.0]])
    np.testing.assert_allclose(windows.returns, [1.0 + 0.5 * -0.5 + 0.25 * -1.25, -0.5 + 0.5 * -1.25, -1.25])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.97, 1.0])
def test_discounted_suffix_sums_over_many_blocks(gamma: float) -> None:
    rewards = np.random.default_rng(0).normal(size=700)  # crosses block boundaries (256)
    expected = np.zeros_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        expected[t] = running
    np.testing.assert_allclose(discounted_suffix_sums(rewards, gamma), expected, rtol=1e-10, atol=1e-10)
    assert discounted_suffix_sums(np.zeros(0), gamma).shape == (0,)


def test_rejects_frames_not_on_a_regular_step_grid() -> None:
    frame = case_frame("a", 4, 50.0)
    frame.loc[2, "time"] = 150.0
    with pytest.raises(ValueError, match="one decision step apart"):
        build_windows(frame, WindowConfig())
    with pytest.raises(ValueError, match="missing columns \\['HR'\\]"):
        build_windows(case_frame("a", 4, 50.0).drop(columns="HR"), WindowConfig())


def many_cases(n: int = 50) -> pd.DataFrame:
    return pd.concat([case_frame(f"case{i:03d}", 3, 40.0, 5) for i in range(n)], ignore_index=True)


def test_split_is_by_case_complete_sized_and_reproducible() -> None:
    frame = many_cases()
    config = WindowConfig()
    parts = split_by_case(frame, config)
    ids = {name: set(part["case_id"]) for name, part in parts.items()}
    assert [len(ids[name]) for name in ("train", "val", "test")] == [35, 8, 7]
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == set(frame["case_id"])
    assert sum(len(part) for part in parts.values()) == len(frame)
    for part in parts.values():
        assert all((part.groupby("case_id").size() == 3).tolist())  # whole cases only

    again = split_by_case(frame, WindowConfig())
    assert all(again[name].equals(parts[name]) for name in parts)
    other = split_by_case(frame, WindowConfig(seed=1))
    assert set(other["test"]["case_id"]) != ids["test"]


def test_window_split_follows_the_case_split() -> None:
    frame = many_cases(20)
    config = WindowConfig(max_len=4, pre_len=2, split=(0.5, 0.25, 0.25))
    windows = build_windows(frame, config)
    parts = split_by_case(windows, config)
    frame_parts = split_by_case(frame, config)
    assert sum(len(part) for part in parts.values()) == len(windows)
    for name, part in parts.items():
        assert isinstance(part, Windows)
        assert set(part.case_ids) == set(frame_parts[name]["case_id"])
        assert len(part) == 2 * len(set(part.case_ids))
        assert part.history.shape[1:] == (4, 8)
    assert split_case_ids(windows.case_ids, config)["val"].tolist() == sorted(set(parts["val"].case_ids))


def test_tiny_split_still_fills_every_part() -> None:
    parts = split_case_ids(["a", "b", "c"], WindowConfig())
    assert sorted(len(ids) for ids in parts.values()) == [1, 1, 1]


def test_window_config_validation() -> None:
    with pytest.raises(ValueError, match="sum"):
        WindowConfig(split=(0.7, 0.2, 0.2))
    with pytest.raises(ValueError, match="gamma"):
        WindowConfig(gamma=1.5)
    with pytest.raises(ValueError, match="max_len"):
        WindowConfig(max_len=0)
