"""Shared fixtures of the planner tests: a tiny simulated dataset (short cases) cut into
windows once per session, and a tiny, fast run config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dosewise.data.anesthesia import CANONICAL, load_cases
from dosewise.data.windows import WindowConfig, Windows, build_windows, split_by_case
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
from dosewise.sim.anesthesia_cases import CaseSpec
from dosewise.sim.anesthesia_clinician import simulate_cases

SHORT_CASES = CaseSpec(duration_min=(20.0, 30.0))
TINY_WINDOWS = WindowConfig(max_len=12, pre_len=3, split=(0.6, 0.4, 0.0), seed=0)


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


@pytest.fixture(scope="session")
def tiny_cases_file(tmp_path_factory):
    """Six simulated cases of 20-30 minutes, written as `dosewise simulate anesthesia` does."""
    path = tmp_path_factory.mktemp("planner") / "cases.parquet"
    simulate_cases(6, seed=0, spec=SHORT_CASES).to_parquet(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_frame(tiny_cases_file):
    frame, _ = load_cases(tiny_cases_file, CANONICAL)
    return frame


@pytest.fixture(scope="session")
def tiny_windows(tiny_frame) -> dict[str, Windows]:
    parts = split_by_case(tiny_frame, TINY_WINDOWS)
    return {name: build_windows(parts[name], TINY_WINDOWS) for name in ("train", "val")}


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
