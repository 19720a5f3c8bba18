"""Sweeps: clear errors for bad grid files, and every point equal to its config trained alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dosewise.algos.iql import IQLConfig
from dosewise.algos.sweep import SweepError, load_grid, point_name, train_sweep
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import MODEL_FORMAT, train_iql
from dosewise.checkpoint import CheckpointError, load_safe

FEATURES = ("level", "creat", "hr")


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid: [1, 2", "not valid YAML"),
        ("lr: [1.0e-3]\n", "one top-level key 'grid:'"),
        ("grid: {}\n", "one top-level key 'grid:'"),
        ("grid:\n  batch_size: [32, 64]\n", "'batch_size' cannot be swept"),
        ("grid:\n  lr: 1.0e-3\n", "grid.lr: expected a non-empty list"),
        ("grid:\n  lr: []\n", "grid.lr: expected a non-empty list"),
        ("grid:\n  lr: [1.0e-3, -1]\n", "grid.lr: Input should be greater than 0"),
        ("grid:\n  tau: [0.7, 1.5]\n", "grid.tau"),
        ("grid:\n  hidden: [[32, 32], fat]\n", "grid.hidden"),
    ],
)
def test_bad_sweep_files_are_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SweepError, match=message) as err:
        load_grid(_grid(tmp_path, text), IQLConfig())
    assert str(tmp_path / "grid.yaml") in str(err.value)


def test_missing_sweep_file(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="sweep file not found"):
        load_grid(tmp_path / "nope.yaml", IQLConfig())


def test_grid_is_every_combination_over_the_base_config(tmp_path: Path) -> None:
    base = IQLConfig(batch_size=16, lr=1e-3)
    configs = load_grid(_grid(tmp_path, "grid:\n  gamma: [0.5, 0.9]\n  hidden: [[8], [4, 4]]\n"), base)
    assert [(c.gamma, c.hidden) for c in configs] == [(0.5, (8,)), (0.5, (4, 4)), (0.9, (8,)), (0.9, (4, 4))]
    assert all(c.batch_size == 16 and c.lr == 1e-3 for c in configs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, make_run, small_data, _one_torch_thread):
    out = tmp_path_factory.mktemp("sweep")
    run = make_run(FEATURES, train=dict(steps=30, checkpoint_every=10))
    grid = tmp_path_factory.mktemp("grid") / "grid.yaml"
    grid.write_text("grid:\n  lr: [1.0e-3, 1.0e-2]\n  beta: [0.5, 3.0]\n  hidden: [[16, 16], [8]]\n")
    configs = load_grid(grid, run.iql)
    report = train_sweep(run, small_data, out, configs, seeds=[0, 1], show_progress=False)
    return out, run, configs, report


def test_sweep_writes_one_run_per_point_and_a_summary(swept) -> None:
    out, _, configs, report = swept
    assert len(report["points"]) == len(configs) * 2 == 16
    assert len(report["summary"]) == 8 and all(row["seeds"] == [0, 1] for row in report["summary"])
    assert json.loads((out / "sweep.json").read_text())["summary"][0]["losses"]["loss/q"].keys() == {"mean", "sd"}
    assert sorted(p.name for p in (out / "groups").iterdir()) == ["h16x16", "h8"]
    model = TrainedIQL.load(out / point_name(configs[3], 1))
    assert model.config == configs[3] and model.seeds == [1] and model.run_config.train.seed == 1
    with pytest.raises(CheckpointError, match="sweep group"):
        TrainedIQL.load(out / "groups" / "h8")


@pytest.mark.parametrize("index", [0, 3, 6])
def test_every_point_equals_its_config_trained_alone(tmp_path: Path, swept, small_data, index: int) -> None:
    out, run, configs, _ = swept
    config, seed = configs[index], 1
    alone = run.model_copy(update={"iql": config, "train": run.train.model_copy(update={"seed": seed})})
    train_iql(alone, small_data, tmp_path, show_progress=False)
    mine = load_safe(out / point_name(config, seed) / "model.pt", MODEL_FORMAT)["networks"]
    theirs = load_safe(tmp_path / "model.pt", MODEL_FORMAT)["networks"]
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_cli_sweep_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dosewise.cli import app

    data = tmp_path / "v.csv"
    assert CliRunner().invoke(app, ["simulate", "vancomycin", "--patients", "5", "--out", str(data)]).exit_code == 0
    grid = _grid(tmp_path, "grid:\n  momentum: [0.9]\n")
    result = CliRunner().invoke(app, ["train", "iql", "--data", str(data), "--out", str(tmp_path / "run"), "--sweep", str(grid)])
    assert result.exit_code == 2
    assert "'momentum' cannot be swept" in result.output and "Traceback" not in result.output
