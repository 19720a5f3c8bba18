import numpy as np
import pytest

from dosewise.data.transitions import Transitions
from dosewise.evaluate.vancomycin.offline import discounted_episode_returns


def test_monte_carlo_return_is_discounted_per_patient_from_the_first_row():
    rewards = np.array([1.0, 1.0, 1.0, 2.0, 0.0], dtype=np.float32)
    n = rewards.shape[0]
    transitions = Transitions(
        observations=np.zeros((n, 1), np.float32),
        actions=np.zeros((n, 1), np.float32),
        rewards=rewards,
        next_observations=np.zeros((n, 1), np.float32),
        dones=np.array([0, 0, 1, 0, 1], np.float32),
        patient_ids=np.array(["a", "a", "a", "b", "b"], dtype=object),
        times=np.array([0, 4, 8, 0, 4.0]),
        episode_starts=np.array([1, 0, 0, 1, 0], bool),
        feature_names=("x",),
    )
    returns = discounted_episode_returns(transitions, gamma=0.5)
    np.testing.assert_allclose(returns, [1 + 0.5 + 0.25, 2.0])
    assert returns.mean() == pytest.approx((1.75 + 2.0) / 2)
