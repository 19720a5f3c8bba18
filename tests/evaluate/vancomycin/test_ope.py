"""Off-policy estimators on problems whose answer is known in closed form."""

import json

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
    is_stochastic,
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
        assert out[name]["not_estimable"] is None, name
        assert out[name]["estimate"] == pytest.approx(truth, abs=0.03), name
    # FQE's interval comes from only 5 refits here: check the estimate, and that the interval is a real one.
    assert out["fqe"]["not_estimable"] is None and out["fqe"]["estimate"] == pytest.approx(truth, abs=0.03)
    assert 0.0 < out["fqe"]["ci95"][1] - out["fqe"]["ci95"][0] < 0.1
    assert 0.05 < out["ess"]["fraction"] <= 1.0
    assert out["ess"]["ci95"][0] <= out["ess"]["estimate"] <= out["ess"]["ci95"][1]
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


class GaussianTarget:
    """A stochastic target a ~ N(0.4 s, sd^2): its value on the bandit is true_value(sd)."""

    def __init__(self, sd: float, seed: int):
        self.sd, self.rng = sd, np.random.default_rng(seed)

    def __call__(self, obs):
        return 0.4 * obs[:, 0] + self.sd * self.rng.standard_normal(obs.shape[0])

    def log_prob(self, obs, actions):
        return kernel_log_density(actions, 0.4 * obs[:, 0], self.sd)


def test_a_stochastic_target_is_estimated_with_exact_ratios_by_all_three_estimators():
    sd = 0.25
    out = evaluate_ope(GaussianTarget(sd, seed=0), bandit(1000, 3), gamma=0.9, seed=0, config=FAST)
    truth = true_value(sd)  # 0.934; clipping to [-1, 1] moves it by < 1e-4 here
    assert out["target"] == "stochastic" and out["bandwidth"] is None
    for name in ("fqe", "wis", "wdr"):
        assert out[name]["not_estimable"] is None, name
        assert out[name]["estimate"] == pytest.approx(truth, abs=0.015), name
        low, high = out[name]["ci95"]
        assert 0.0 < high - low < 0.05, name
        if name != "fqe":  # FQE's interval comes from 5 refits only: a rough one
            assert low <= truth <= high, name
    # N(0.4 s, 0.25^2) against N(0.2 + 0.5 s, 0.3^2): about 2/3 of the courses' worth of weight.
    assert 0.5 < out["ess"]["fraction"] < 0.8
    assert out["overlap"] > 0.9
    json.dumps(out, allow_nan=False)


def test_perturbed_behaviour_has_the_density_of_its_samples_and_is_seeded():
    t = bandit(2000, 1)
    model, _ = BehaviourModel.fit(t.observations, t.actions, OPEConfig(behaviour_steps=300, behaviour_hidden=(32, 32)), seed=0)
    target = model.perturbed(shift=0.3, extra_sd=0.2, seed=7, feature_names=("s",))
    assert is_stochastic(target) and target.feature_names == ("s",)
    state = np.full((200_000, 1), 0.5, np.float32)
    draws = target(state)
    # Mean and variance of the convolution: the mixture's, moved by the shift and widened by extra_sd^2.
    assert draws.mean() == pytest.approx(model.mean(state[:1])[0] + 0.3, abs=0.005)
    assert draws.var() == pytest.approx(model.std(state[:1])[0] ** 2 + 0.2**2, rel=0.02)
    # Histogram of the samples against exp(log_prob) at the bin centres (density ~1.1 at its peak).
    counts, edges = np.histogram(draws, bins=40, range=(-0.6, 2.0))
    centres = (edges[:-1] + edges[1:]) / 2
    empirical = counts / (len(draws) * (edges[1] - edges[0]))
    analytic = np.exp(target.log_prob(state[: len(centres)], centres))
    assert np.abs(empirical - analytic).max() < 0.03
    grid = np.linspace(-3, 4, 7001)
    assert np.trapezoid(np.exp(target.log_prob(np.full((len(grid), 1), 0.5, np.float32), grid)), grid) == pytest.approx(1.0, abs=1e-6)
    # A fresh object with the same seed repeats the draws, call by call; another seed does not.
    again = model.perturbed(shift=0.3, extra_sd=0.2, seed=7)
    np.testing.assert_array_equal(again(state), draws)
    np.testing.assert_array_equal(again(state[:100]), target(state[:100]))
    assert not np.array_equal(again(state[:100]), again(state[:100]))
    assert not np.array_equal(model.perturbed(0.3, 0.2, seed=8)(state), draws)
    # No extra noise and no shift: the behaviour's own density.
    same = model.perturbed(shift=0.0, extra_sd=0.0, seed=0)
    np.testing.assert_allclose(
        same.log_prob(t.observations[:50], t.actions[:50, 0]), model.log_prob(t.observations[:50], t.actions[:50]), atol=1e-5
    )


def test_a_target_far_from_the_data_is_not_estimable_and_says_why():
    out = evaluate_ope(lambda obs: np.ones(obs.shape[0]), bandit(150, 5), gamma=0.9, seed=0, config=FAST)
    text = json.dumps(out, allow_nan=False)  # no NaN anywhere
    assert out["ess"]["estimate"] < 10 and out["ess"]["min_ess"] == 10.0
    for name in ("wis", "wdr"):
        assert out[name]["estimate"] is None and out[name]["ci95"] is None, name
        assert out[name]["not_estimable"].startswith(f"effective sample size {out['ess']['estimate']:.1f} of 150 courses (< 10)"), name
        assert out[name]["raw_estimate"] is not None
    # Always +1 is supported only at the states where the clinicians already dose high.
    assert out["overlap"] < 0.5
    assert out["fqe"]["estimate"] is None and f"{100 * out['overlap']:.0f} %" in out["fqe"]["not_estimable"]
    assert "NaN" not in text
    # The same policy judged with looser thresholds is estimated (the checks, not the numbers, withheld it).
    loose = evaluate_ope(
        lambda obs: np.ones(obs.shape[0]),
        bandit(150, 5),
        0.9,
        seed=0,
        config=OPEConfig(**{**FAST.__dict__, "min_ess": 1.0, "min_ess_fraction": 0.0, "min_overlap": 0.0}),
    )
    assert loose["wis"]["estimate"] == pytest.approx(out["wis"]["raw_estimate"]) and loose["fqe"]["not_estimable"] is None


def test_a_policy_that_needs_the_dosing_record_is_not_estimable_and_never_called():
    class NeedsRecord:
        needs_record = True

        def __call__(self, obs, record=None):
            raise AssertionError("a per-state estimator called a policy that needs the dosing record")

    out = evaluate_ope(NeedsRecord(), bandit(50, 0), gamma=0.9, seed=0, config=FAST)
    for name in ("fqe", "wis", "wdr"):
        assert out[name]["estimate"] is None and out[name]["ci95"] is None, name
        assert "dosing history" in out[name]["not_estimable"], name
    assert out["ess"] is None and out["overlap"] is None and out["bandwidth"] is None
    json.dumps(out, allow_nan=False)
