"""Fixtures shared across the test folders: tiny simulated anesthesia cases (20-30 minutes) and
their planner windows, made once per session."""

from __future__ import annotations

import pytest

from dosewise.data.anesthesia import CANONICAL, load_cases
from dosewise.data.windows import WindowConfig, Windows, build_windows, split_by_case
from dosewise.sim.anesthesia.cases import CaseSpec
from dosewise.sim.anesthesia.clinician import simulate_cases

SHORT_CASES = CaseSpec(duration_min=(20.0, 30.0))
TINY_WINDOWS = WindowConfig(max_len=12, pre_len=3, split=(0.6, 0.4, 0.0), seed=0)


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
