"""Off-policy estimators on problems whose answer is known in closed form."""

import numpy as np
import pytest

from dosewise.data.transitions import Transitions
from dosewise.evaluate.vancomycin.ope import (
    BehaviourModel,
    Episodes,
    OPEConfig,
    cumulative_log_weights,
    effective_sample_size,
    evaluate_ope,
    fit_fqe,
    kernel_log_density,
    pdwis,
    policy_actions,
    wdr,
)

FAST = OPEConfig(behaviour_steps=400, fqe_steps=800, fqe_bootstrap=5, n_bootstrap=500)
BEHAVIOUR_SD = 0.3


def behaviour_mean(s):
    return 0.2 + 0.5 * s


def reward_mean(s, a):
    """r(s, a) = 1 - (a - 0.5 s)^2 + 0.1 s: best action 0.5 s."""
    return 1.0 - (a - 0.5 * s) ** 2 + 0.1 * s


def target(obs):
    return 0.4 * obs[:, 0]


# Value of the target smoothed by a Gaussian kernel of width h, s ~ U(-1, 1):
# E[1 - (0.4 s + h z - 0.5 s)^2 + 0.1 s] = 1 - 0.01 E[s^2] - h^2 = 1 - 0.01 / 3 - h^2.
def true_value(h=0.0):
    return 1.0 - 0.01 / 3.0 - h**2


def bandit(n: int, seed: int) -> Transitions:
    """One-step courses: s ~ U(-1, 1), a ~ N(0.2 + 0.5 s, 0.3^2), r = r(s, a) + N(0, 0.1^2), all terminal."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, n)
    a = behaviour_mean(s) + BEHAVIOUR_SD * rng.standard_normal(n)
    r = reward_mean(s, a) + 0.1 * rng.standard_normal(n)
    obs = s[:, None].astype(np.float32)
    return Transitions(
        observations=obs,
        actions=a[:, None].astype(np.float32),
        rewards=r.astype(np.float32),
        next_observations=obs.copy(),
        dones=np.ones(n, np.float32),
        patient_ids=np.array([f"P{i}" for i in range(n)], dtype=object),
        times=np.zeros(n),
        episode_starts=np.ones(n, bool),
        feature_names=("s",),
    )


def known_log_ratios(t: Transitions, h: float) -> np.ndarray:
    s, a = t.observations[:, 0].astype(float), t.actions[:, 0].astype(float)
    return kernel_log_density(a, 0.4 * s, h) - kernel_log_density(a, behaviour_mean(s), BEHAVIOUR_SD)


def test_weighted_estimators_are_consistent_on_a_bandit_with_known_ratios():
    h = 0.1

    def mean_error(n):
        errors = []
        for seed in range(20):
            t = bandit(n, seed)
            log_w = known_log_ratios(t, h)[:, None]  # [E, T=1]
            r = t.rewards[:, None].astype(float)
            q = reward_mean(t.observations[:, 0], t.actions[:, 0])[:, None].astype(float) * 0.0  # no model: WDR = WIS
            errors.append([abs(pdwis(r, log_w, 0.9) - true_value(h)), abs(wdr(r, log_w, q, q, 0.9) - true_value(h))])
        return np.mean(errors, axis=0)

    small, large = mean_error(100), mean_error(4000)
    assert np.all(large < 0.03)
    assert np.all(large < small / 3)


def test_padding_is_an_absorbing_state_and_on_policy_wis_is_the_mean_return():
    rewards = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])  # course 2 lasts one step
    mask = np.array([[True, True, True], [True, False, False]])
    log_w = cumulative_log_weights(np.zeros((2, 3)), mask)
    gamma = 0.5
    returns = [1 + 0.5 * 2 + 0.25 * 3, 4.0]
    assert pdwis(rewards, log_w, gamma) == pytest.approx(np.mean(returns))
    assert wdr(rewards, log_w, np.zeros_like(rewards), np.zeros_like(rewards), gamma) == pytest.approx(np.mean(returns))


def test_wdr_returns_the_model_value_when_the_model_is_bellman_consistent_whatever_the_weights():
    rng = np.random.default_rng(0)
    gamma, mask = 0.9, np.array([[True, True, True], [True, True, False], [True, False, False]])
    v = np.where(mask, rng.normal(size=(3, 3)), 0.0)
    v_next = np.concatenate([v[:, 1:], np.zeros((3, 1))], axis=1)
    rewards = np.where(mask, rng.normal(size=(3, 3)), 0.0)
    q = np.where(mask, rewards + gamma * v_next, 0.0)  # deterministic dynamics: Q = r + gamma V(s')
    log_w = cumulative_log_weights(np.where(mask, rng.normal(size=(3, 3)), 0.0), mask)
    assert wdr(rewards, log_w, q, v, gamma) == pytest.approx(v[:, 0].mean())


def test_ratio_clipping_caps_each_decision():
    log_w = cumulative_log_weights(np.log([[1000.0, 2.0]]), np.ones((1, 2), bool), max_ratio=10.0)
    np.testing.assert_allclose(np.exp(log_w), [[10.0, 20.0]])


def test_effective_sample_size_is_n_for_equal_weights_and_one_for_a_dominant_weight():
    assert effective_sample_size(np.zeros(50)) == pytest.approx(50.0)
    dominant = np.zeros(50)
    dominant[7] = 40.0  # e^40 against 49 ones
    assert effective_sample_size(dominant) == pytest.approx(1.0, abs=1e-9)
    assert effective_sample_size(np.log([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)


def test_behaviour_model_recovers_a_conditional_gaussian():
    t = bandit(2000, 1)
    model, stats = BehaviourModel.fit(t.observations, t.actions, OPEConfig(behaviour_steps=400, behaviour_hidden=(32, 32)), seed=0)
    grid = np.linspace(-0.9, 0.9, 19)[:, None].astype(np.float32)
    assert np.abs(model.mean(grid) - behaviour_mean(grid[:, 0])).max() < 0.08
    assert np.abs(model.std(grid) - BEHAVIOUR_SD).max() < 0.06
    assert stats["nll"] == pytest.approx(0.5 * np.log(2 * np.pi * np.e * BEHAVIOUR_SD**2), abs=0.05)


def test_fqe_recovers_the_one_step_q_function():
    t = bandit(2000, 2)
    s = t.observations
    fqe = fit_fqe(t, target(s), target(s), 0.9, FAST, seed=0)
    assert np.abs(fqe.q_data - reward_mean(s[:, 0], t.actions[:, 0])).mean() < 0.05
    assert fqe.member_values[0] == pytest.approx(true_value(), abs=0.03)


def test_evaluate_ope_is_close_to_the_truth_and_its_intervals_cover_it():
    out = evaluate_ope(target, bandit(1500, 3), gamma=0.9, seed=0, config=FAST)
    truth = true_value(out["bandwidth"])
    for name in ("wis", "wdr"):  # 1500 courses resampled 500 times
        low, high = out[name]["ci95"]
        assert low <= truth <= high, name
        assert out[name]["mean"] == pytest.approx(truth, abs=0.03), name
    # FQE's interval comes from only 5 refits here: check the estimate, and that the interval is a real one.
    assert out["fqe"]["mean"] == pytest.approx(truth, abs=0.03)
    assert 0.0 < out["fqe"]["ci95"][1] - out["fqe"]["ci95"][0] < 0.1
    assert 0.05 < out["ess"]["fraction"] <= 1.0
    assert out["ess"]["ci95"][0] <= out["ess"]["mean"] <= out["ess"]["ci95"][1]
    assert set(out["behaviour_model"]) >= {"nll", "mean_abs_error", "steps"}


def test_evaluate_ope_is_seeded():
    t = bandit(300, 4)
    tiny = OPEConfig(behaviour_steps=50, fqe_steps=100, fqe_bootstrap=2, n_bootstrap=100)
    a = evaluate_ope(target, t, 0.9, seed=5, config=tiny)
    b = evaluate_ope(target, t, 0.9, seed=5, config=tiny)
    assert a["fqe"] == b["fqe"] and a["wis"] == b["wis"] and a["wdr"] == b["wdr"]


def test_bad_policies_and_gamma_raise_clear_errors():
    t = bandit(20, 0)
    with pytest.raises(ValueError, match="one action per state"):
        evaluate_ope(lambda obs: np.zeros((obs.shape[0], 2)), t, 0.9, config=FAST)
    with pytest.raises(ValueError, match="one action per state"):
        policy_actions(lambda obs: np.zeros(3), t.observations)
    with pytest.raises(ValueError, match="non-finite"):
        policy_actions(lambda obs: np.full(obs.shape[0], np.nan), t.observations)
    with pytest.raises(ValueError, match="gamma"):
        evaluate_ope(target, t, 1.0, config=FAST)
    np.testing.assert_array_equal(policy_actions(lambda obs: np.full((obs.shape[0], 1), 3.0), t.observations), 1.0)


def test_episodes_pad_variable_lengths():
    t = bandit(5, 0)
    starts = np.array([True, False, False, True, False])
    t = Transitions(**{**{k: getattr(t, k) for k in t.__dataclass_fields__}, "episode_starts": starts})
    ep = Episodes.from_transitions(t)
    np.testing.assert_array_equal(ep.mask, [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(ep.of_rows(), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ep.pad(np.arange(5.0), fill=-1), [[0, 1, 2], [3, 4, -1]])
