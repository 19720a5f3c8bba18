"""Shared helpers for the IQL tests: hand-built Transitions and a small, fast run config."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.iql import IQLConfig
from dosewise.data.schema import DataConfig
from dosewise.data.transitions import Transitions


def _make_transitions(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    next_observations: np.ndarray | None = None,
    dones: np.ndarray | None = None,
    feature_names: tuple[str, ...] | None = None,
) -> Transitions:
    """Transitions straight from arrays; every row is its own one-row 'patient' unless dones say otherwise."""
    obs = np.asarray(observations, dtype=np.float32)
    n, d = obs.shape
    nxt = obs if next_observations is None else np.asarray(next_observations, dtype=np.float32)
    done = np.ones(n, dtype=np.float32) if dones is None else np.asarray(dones, dtype=np.float32)
    starts = np.ones(n, dtype=bool)
    starts[1:] = done[:-1] == 1.0
    return Transitions(
        observations=obs,
        actions=np.asarray(actions, dtype=np.float32).reshape(n, 1),
        rewards=np.asarray(rewards, dtype=np.float32).reshape(n),
        next_observations=nxt,
        dones=done,
        patient_ids=np.array([f"p{i}" for i in np.cumsum(starts)], dtype=object),
        times=np.zeros(n, dtype=np.float64),
        episode_starts=starts,
        feature_names=feature_names or tuple(f"x{j}" for j in range(d)),
    )


@pytest.fixture(scope="session")
def make_transitions() -> Callable[..., Transitions]:
    return _make_transitions


def _make_run(feature_names: tuple[str, ...], iql: dict | None = None, train: dict | None = None) -> IQLRunConfig:
    iql_kw = dict(lr=1e-3, hidden=(16, 16), batch_size=32)
    iql_kw.update(iql or {})
    train_kw = dict(steps=60, checkpoint_every=20, log_every=10, seed=0)
    train_kw.update(train or {})
    return IQLRunConfig(data=DataConfig(features=feature_names), iql=IQLConfig(**iql_kw), train=TrainConfig(**train_kw))


@pytest.fixture(scope="session")
def make_run() -> Callable[..., IQLRunConfig]:
    return _make_run


@pytest.fixture(scope="session")
def small_data() -> Transitions:
    """200 transitions, 3 features, episodes of 5 steps, reward depending on state and action."""
    rng = np.random.default_rng(0)
    n, d = 200, 3
    obs = rng.normal(size=(n, d)) * [2.0, 0.5, 10.0] + [20.0, 1.0, 100.0]
    actions = rng.uniform(-1, 1, size=n)
    dones = (np.arange(n) % 5 == 4).astype(np.float32)
    nxt = np.where(dones[:, None] == 1, obs, np.roll(obs, -1, axis=0))
    rewards = -np.abs(actions - 0.1 * (obs[:, 0] - 20.0))
    return _make_transitions(obs, actions, rewards, nxt, dones, ("level", "creat", "hr"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks run fastest on one thread, and timings do not depend on what else runs.

    Module scope: autouse fixtures run first within a scope, so module-scoped trainings see it too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
