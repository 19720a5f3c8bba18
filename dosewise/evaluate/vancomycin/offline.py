"""Offline statistics: what the learned critics say about the data they were fitted on.

These numbers describe the model, not the patients: a greedy Q far above the behaviour Q means
the critic rates actions the clinicians rarely took, which is where it is least reliable.
"""

from __future__ import annotations

import numpy as np

from dosewise.algos.trained import TrainedIQL
from dosewise.data.transitions import Transitions


def discounted_episode_returns(transitions: Transitions, gamma: float) -> np.ndarray:
    """Monte Carlo return of each patient's recorded course from its first row, discounted per step."""
    returns = []
    for episode in transitions.episode_slices():
        rewards = transitions.rewards[episode].astype(np.float64)
        returns.append(float(np.sum(rewards * gamma ** np.arange(rewards.shape[0]))))
    return np.asarray(returns)


def offline_statistics(model: TrainedIQL, transitions: Transitions) -> dict:
    obs, actions = transitions.observations, transitions.actions[:, 0]
    q = model.q_value(obs, actions)
    v = model.value(obs)
    q_curve = model.q_curve(obs)
    policy_q = model.q_value(obs, model.policy_action(obs))
    stats = lambda x: {"mean": float(np.mean(x)), "std": float(np.std(x))}
    return {
        "num_transitions": int(transitions.n),
        "q_stats": stats(q),
        "v_stats": stats(v),
        "greedy_q": float(q_curve.max(axis=1).mean()),
        "policy_q": float(policy_q.mean()),
        "behavior_q": float(q.mean()),
        "mc_return": float(discounted_episode_returns(transitions, model.config.gamma).mean()),
    }
