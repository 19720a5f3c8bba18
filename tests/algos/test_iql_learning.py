"""IQL on toy problems whose answers are known in closed form.

Each problem is trained once per module through the real `train_iql` -> model.pt -> `TrainedIQL`
path, so these tests also pin that the saved bundle (normalisation included) reproduces what the
learner learned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.iql import IQLConfig
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql
from dosewise.data.schema import DataConfig

# The 0.7-expectile e of X ~ U(-1, 1) solves 0.7 (1 - e)^2 = 0.3 (1 + e)^2.
EXPECTILE_07_UNIFORM = (np.sqrt(0.7) - np.sqrt(0.3)) / (np.sqrt(0.7) + np.sqrt(0.3))  # ~0.209


def _expectile(x: np.ndarray, tau: float) -> float:
    lo, hi = float(x.min()), float(x.max())
    for _ in range(100):
        e = (lo + hi) / 2
        if tau * np.maximum(x - e, 0).mean() > (1 - tau) * np.maximum(e - x, 0).mean():
            lo = e
        else:
            hi = e
    return e


def _run(names: tuple[str, ...], steps: int, gamma: float) -> IQLRunConfig:
    return IQLRunConfig(
        data=DataConfig(features=names),
        iql=IQLConfig(lr=3e-3, gamma=gamma, hidden=(64, 64), beta=3.0, tau=0.7, batch_size=128, polyak=0.05),
        train=TrainConfig(steps=steps, checkpoint_every=0, log_every=100, seed=0),
    )


def _a_star(s: np.ndarray) -> np.ndarray:
    return 0.5 * np.sign(s[:, 0])


def _bandit_reward(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    return 1.0 - 4.0 * (a - _a_star(s)) ** 2


# -- one-step contextual bandit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bandit(tmp_path_factory: pytest.TempPathFactory, make_transitions, _one_torch_thread) -> TrainedIQL:
    """s ~ N(0, I_3), a ~ U(-1, 1), every step terminal, r = 1 - 4 (a - 0.5 sign(s_0))^2."""
    rng = np.random.default_rng(0)
    n = 4000
    s = rng.standard_normal((n, 3))
    a = rng.uniform(-1.0, 1.0, n)
    data = make_transitions(s, a, _bandit_reward(s, a), dones=np.ones(n))
    out = tmp_path_factory.mktemp("bandit")
    train_iql(_run(data.feature_names, steps=1000, gamma=0.9), data, out, show_progress=False)
    return TrainedIQL.load(out)


@pytest.fixture(scope="module")
def test_states() -> np.ndarray:
    s = np.random.default_rng(123).standard_normal((600, 3))
    # away from the switch of a* at s_0 = 0, and inside the bulk of the data (no tail extrapolation)
    return s[(np.abs(s[:, 0]) > 0.25) & (np.abs(s).max(axis=1) < 2.0)]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bandit_policy_mean_finds_the_best_action(bandit: TrainedIQL, test_states: np.ndarray, sign: float) -> None:
    s = test_states[np.sign(test_states[:, 0]) == sign]
    action = bandit.policy_action(s)
    assert np.abs(action - 0.5 * sign).mean() < 0.2
    assert np.mean(np.sign(action) == sign) > 0.95


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bandit_greedy_action_finds_the_best_action(bandit: TrainedIQL, test_states: np.ndarray, sign: float) -> None:
    s = test_states[np.sign(test_states[:, 0]) == sign]
    greedy = bandit.greedy_action(s)
    np.testing.assert_array_equal(greedy, bandit.action_grid()[bandit.q_curve(s).argmax(axis=1)])
    assert np.abs(greedy - 0.5 * sign).mean() < 0.2


def test_bandit_q_prefers_the_best_action_and_matches_the_reward(bandit: TrainedIQL, test_states: np.ndarray) -> None:
    a_star = _a_star(test_states)
    q_best = bandit.q_value(test_states, a_star)
    q_worst = bandit.q_value(test_states, -a_star)
    assert np.all(q_best > q_worst)
    # true values: Q(s, a*) = 1 and Q(s, -a*) = 1 - 4 = -3; the critic regresses onto r itself
    assert q_best.mean() == pytest.approx(1.0, abs=0.35)
    assert q_worst.mean() == pytest.approx(-3.0, abs=0.5)
    grid = bandit.action_grid()
    curve = bandit.q_curve(test_states)
    true_curve = 1.0 - 4.0 * (grid[None, :] - a_star[:, None]) ** 2
    assert np.abs(curve - true_curve).mean() < 0.3


def test_bandit_value_is_the_upper_expectile_of_q(bandit: TrainedIQL, test_states: np.ndarray) -> None:
    v = bandit.value(test_states)
    curve = bandit.q_curve(test_states)  # grid is uniform on [-1, 1], like the behaviour actions
    assert np.all(v > curve.mean(axis=1))  # tau = 0.7 > 0.5: above the mean of Q over data actions
    assert np.all(v < curve.max(axis=1))  # and below its maximum
    grid = np.linspace(-1, 1, 20001)
    true_v = _expectile(1.0 - 4.0 * (grid - 0.5) ** 2, 0.7)  # ~ -0.52, the same for every s by symmetry
    assert v.mean() == pytest.approx(true_v, abs=0.2)


# -- two-step chain: the value must travel back through gamma ---------------------------------------

CHAIN_GAMMA = 0.5


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, make_transitions, _one_torch_thread) -> TrainedIQL:
    """Step 1: s = (y, 0), action a1, no reward, next state (a1, 1). Step 2: s = (y, 1), any action, r = y, terminal.

    So Q(s1, a) = gamma * a: the reward is paid one step later, and depends on the earlier action
    only through the next state.
    """
    rng = np.random.default_rng(1)
    n = 2000
    y0, a1, a2 = rng.standard_normal(n), rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    first = np.stack([y0, np.zeros(n)], axis=1)
    second = np.stack([a1, np.ones(n)], axis=1)
    data = make_transitions(
        observations=np.concatenate([first, second]),
        actions=np.concatenate([a1, a2]),
        rewards=np.concatenate([np.zeros(n), a1]),
        next_observations=np.concatenate([second, second]),
        dones=np.concatenate([np.zeros(n), np.ones(n)]),
        feature_names=("y", "phase"),
    )
    out = tmp_path_factory.mktemp("chain")
    train_iql(_run(data.feature_names, steps=1000, gamma=CHAIN_GAMMA), data, out, show_progress=False)
    return TrainedIQL.load(out)


def _first_states(n: int = 200) -> np.ndarray:
    return np.stack([np.random.default_rng(9).standard_normal(n), np.zeros(n)], axis=1)


def test_chain_second_step_values_are_the_reward(chain: TrainedIQL) -> None:
    y = np.linspace(-0.9, 0.9, 7)
    s = np.stack([y, np.ones_like(y)], axis=1)
    np.testing.assert_allclose(chain.value(s), y, atol=0.1)
    curve = chain.q_curve(s)
    np.testing.assert_allclose(curve, np.repeat(y[:, None], curve.shape[1], axis=1), atol=0.15)


def test_chain_first_step_q_is_discounted_next_value(chain: TrainedIQL) -> None:
    s = _first_states()
    grid = chain.action_grid()
    curve = chain.q_curve(s)
    slope, intercept = np.polyfit(grid, curve.mean(axis=0), 1)
    assert slope == pytest.approx(CHAIN_GAMMA, abs=0.1)  # gamma^2 or 1 would be far off
    assert intercept == pytest.approx(0.0, abs=0.1)
    diff = chain.q_value(s, np.full(len(s), 0.5)) - chain.q_value(s, np.full(len(s), -0.5))
    assert diff.mean() == pytest.approx(CHAIN_GAMMA, abs=0.1)
    np.testing.assert_array_equal(chain.greedy_action(s), np.ones(len(s), dtype=np.float32))
    assert chain.value(s).mean() == pytest.approx(CHAIN_GAMMA * EXPECTILE_07_UNIFORM, abs=0.07)
    assert chain.policy_action(s).mean() > 0.2  # the policy leans towards the larger next-step reward


# -- gamma = 0: Q is plain regression onto r ------------------------------------------------------


def test_gamma_zero_q_regresses_onto_reward_without_terminals(tmp_path: Path, make_transitions) -> None:
    rng = np.random.default_rng(2)
    n = 2000
    s = rng.standard_normal((n, 2))
    a = rng.uniform(-1, 1, n)
    r = s[:, 0] * a + 0.5 * s[:, 1]
    nxt = rng.standard_normal((n, 2)) * 3.0  # unrelated next states must not matter at gamma = 0
    data = make_transitions(s, a, r, next_observations=nxt, dones=np.zeros(n))
    train_iql(_run(data.feature_names, steps=600, gamma=0.0), data, tmp_path, show_progress=False)
    model = TrainedIQL.load(tmp_path)

    st = np.random.default_rng(3).uniform(-1.5, 1.5, (300, 2))
    at = np.random.default_rng(4).uniform(-1, 1, 300)
    q = model.q_value(st, at)
    target = st[:, 0] * at + 0.5 * st[:, 1]
    assert np.abs(q - target).mean() < 0.1
    assert np.corrcoef(q, target)[0, 1] > 0.98
