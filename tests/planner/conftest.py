"""Shared fixtures of the planner tests: a tiny, fast run config, a batch and a model over the
tiny simulated cases of `tests/conftest.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dosewise.planner.config import (
    ClosedLoopConfig,
    MonitorConfig,
    OptimConfig,
    PlannerModelConfig,
    PlannerRunConfig,
    PlannerTrainConfig,
    StrategyConfig,
)
from dosewise.planner.data import window_tensors
from dosewise.planner.model import PlannerModel, PlannerStats
from tests.conftest import TINY_WINDOWS


def tiny_run(strategy: str = "joint", epochs: int = 1, **strategy_fields) -> PlannerRunConfig:
    return PlannerRunConfig(
        windows=TINY_WINDOWS,
        model=PlannerModelConfig(d_model=16, n_heads=2, encoder_layers=1, dynamics_layers=1, ff_mult=2),
        strategy=StrategyConfig(name=strategy, **strategy_fields),
        optim=OptimConfig(lr=3e-3),
        train=PlannerTrainConfig(epochs=epochs, batch_size=64, seed=0, threads=1),
        monitor=MonitorConfig(),
        closed_loop=ClosedLoopConfig(cases=0),
    )


@pytest.fixture()
def tiny_batch(tiny_windows):
    keep = np.arange(min(32, len(tiny_windows["train"])))
    return window_tensors(tiny_windows["train"].select(keep), TINY_WINDOWS.gamma)


@pytest.fixture()
def tiny_model(tiny_windows) -> PlannerModel:
    """The tiny run's model, untrained, with the training windows' statistics (eval mode)."""
    run = tiny_run()
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len)
    model.set_stats(PlannerStats.from_windows(tiny_windows["train"]))
    return model.eval()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    torch.set_num_threads(1)
