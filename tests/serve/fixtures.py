"""Runs the service tests serve, made once per session: a small IQL run (vancomycin) and a tiny
planner run (anesthesia), a case history as the JSON rows a client sends, and apps over them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from dosewise import api
from dosewise.data.schema import EXAMPLE_STATE
from dosewise.data.windows import build_windows, split_by_case
from dosewise.planner.config import ClosedLoopConfig
from dosewise.planner.training import train_planner
from dosewise.serve.app import create_app
from dosewise.serve.registry import load_models
from dosewise.serve.service import Service
from dosewise.serve.store import Store
from tests.planner.conftest import tiny_run

STATE = dict(EXAMPLE_STATE)  # a state inside every physiological range, 13 features


@pytest.fixture(scope="session")
def iql_run(tmp_path_factory):
    """IQL (iql_conservative, 120 steps) on 30 simulated patients: a run directory named `iql`."""
    root = tmp_path_factory.mktemp("serve_iql")
    api.simulate_vancomycin(root / "vanco.parquet", patients=30, seed=5)
    run = api.resolve_iql_run("iql_conservative", root / "vanco.parquet", steps=120, seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.train_iql_from_file(root / "vanco.parquet", root / "iql", run, echo=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return root / "iql"


@pytest.fixture(scope="session")
def planner_run(tiny_frame, tmp_path_factory):
    """The tiny planner trained for one epoch on the tiny cases: a run directory named `planner`."""
    loop = ClosedLoopConfig(cases=0, modes=("mpc", "argmax"), default_mode="argmax", max_rate=(150, 120))
    run = tiny_run(epochs=1).model_copy(update={"closed_loop": loop})
    parts = split_by_case(tiny_frame, run.windows)
    out = tmp_path_factory.mktemp("serve_planner") / "planner"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        train_planner(run, *(build_windows(parts[name], run.windows) for name in ("train", "val")), out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="session")
def history_rows(tiny_cases_file) -> list[dict]:
    """The first 10 rows of a tiny case as JSON rows (what a client sends as `rows`)."""
    raw = pd.read_parquet(tiny_cases_file)
    case = raw["case_id"].iloc[0]
    rows = raw[raw["case_id"] == case].sort_values("time").head(10)
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()} for row in rows.to_dict("records")]


@pytest.fixture(scope="session")
def loaded_models(iql_run, planner_run):
    return load_models([iql_run, planner_run])


@pytest.fixture()
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    yield store
    store.close()


@pytest.fixture()
def client(loaded_models, store):
    """The service over both runs with a fresh SQLite audit log, auth off (no token)."""
    with TestClient(create_app(Service(loaded_models), store)) as client:
        yield client
